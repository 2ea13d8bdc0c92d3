"""The servers under comparison, each started as its own process on a free loopback port."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmchat.engine.loader import resolve_source


@dataclass
class Server:
    name: str
    command: list[str]
    model: str  # what requests send as "model"
    ready_path: str
    proc: subprocess.Popen | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout_s: float = 900) -> None:
        log = (log_dir / f"{self.name}.log").open("w")
        env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
        self.proc = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {log.name}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f}s; see {log.name}")

    def peak_rss_bytes(self) -> int:
        """VmHWM: the most resident memory the process has held so far."""
        return self._status_bytes("VmHWM:")

    def rss_bytes(self) -> int:
        """VmRSS: resident memory now."""
        return self._status_bytes("VmRSS:")

    def _status_bytes(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llmchat(extra: list[str], name: str = "llmchat") -> Server:
    """llmchat serve with `extra` flags; requests name the model that `--model` (default: the bundled one) serves as."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmchat", "serve", "--port", str(port), "--log-level", "warning", *extra]
    model = extra[extra.index("--model") + 1] if "--model" in extra[:-1] else "bundled"
    return Server(name, cmd, resolve_source(model).name, "/health", port=port)


def transformers_serve(weights_dir: Path, dtype: str = "auto") -> Server | None:
    """`dtype` auto is what the weights are stored in (float32 for the converted GGUF)."""
    # By module, not the `transformers` script: .venv-dev imports .venv's packages but has no scripts of its own.
    if importlib.util.find_spec("transformers.cli.transformers") is None:
        return None
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(weights_dir),
        "--continuous-batching",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    name = "transformers-serve-cb"
    if dtype != "auto":
        cmd += ["--dtype", dtype]
        name += f"-{dtype}"
    return Server(name, cmd, str(weights_dir), "/health", port=port)


def llama_cpp(gguf: Path, python: str | None = None, tools: bool = False, prompt_cache: bool = False) -> Server | None:
    """llama.cpp's server on the GGUF itself, run by `python` (an interpreter with llama-cpp-python[server]).

    With `tools`, its chatml-function-calling chat format: the GGUF's own template ignores tools, and this is
    the ChatML format (SmolLM2's) that honours tools and tool_choice, with a grammar for named calls. Without
    tools in a request it renders plain ChatML, but without the template's default system prompt.

    With `prompt_cache`, --cache True keeps evaluated prompts in RAM (LlamaRAMCache) for reuse by a later prompt
    sharing their prefix, as the agent scenario's interleaved turns do. Each saved prompt copies the server's
    whole table of scores, n_ctx x vocabulary floats: 5 GB for Qwen2.5's 151k tokens, which killed the server
    at 1.5k-token prompts on a 24 GiB host. Without it the server reuses the previous request's tokens, which
    serves the other scenarios' shared prefixes, sent one request after another, as well."""
    python = python or sys.executable
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        return None
    port = free_port()
    # Without --interrupt_requests False each new request cancels the one in flight.
    cmd = [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--interrupt_requests",
        "False",
        "--n_ctx",
        "8192",
        "--cache",
        str(prompt_cache),
        # llama-cpp-python's default is half the CPUs; llmchat (torch) uses all of them.
        "--n_threads",
        str(os.cpu_count() or 1),
        "--n_threads_batch",
        str(os.cpu_count() or 1),
    ]
    if tools:
        cmd += ["--chat_format", "chatml-function-calling"]
    return Server("llama.cpp", cmd, gguf.name, "/v1/models", port=port)
