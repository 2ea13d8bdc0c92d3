"""Shared fixtures: in-memory span capture for the whole session and a live llmchat on a loopback port."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hrserve import setup_otel

SPANS = InMemorySpanExporter()
# The tool the tool-calling tests offer, through every protocol.
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
# The global tracer provider can be set once per process: do it before any app is created.
setup_otel("llmchat-tests", "0", span_exporters=[SPANS], metric_readers=[])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    app: object
    server: uvicorn.Server
    thread: threading.Thread
    base_url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(app, ready_timeout_s: float = 900.0, wait_ready: bool = True) -> LiveServer:
    """Runs `app` under a real uvicorn on a free loopback port; waits for /health to say ok."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(app, server, thread, f"http://127.0.0.1:{port}")
    if wait_ready:
        deadline = time.monotonic() + ready_timeout_s
        while (status := httpx.get(f"{live.base_url}/health").json()["status"]) == "loading":
            if time.monotonic() > deadline:
                raise RuntimeError("model did not load in time")
            time.sleep(0.5)
        assert status == "ok", httpx.get(f"{live.base_url}/health").json()
    return live


@pytest.fixture(scope="session")
def live() -> LiveServer:
    """llmchat with the real bundled model (the first run converts and caches the GGUF weights)."""
    from llmchat.server import create_app
    from llmchat.settings import Settings

    server = start_server(create_app(Settings(port=0)))
    yield server
    server.stop()


def serve_template(folder: Path, template: str) -> LiveServer:
    """llmchat with the bundled model under `template` as its chat template (written into `folder`)."""
    from llmchat.server import create_app
    from llmchat.settings import Settings

    path = folder / "chat_template.jinja"
    path.write_text(template)
    return start_server(create_app(Settings(port=0, chat_template=path)))


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The span exporter, emptied of what earlier tests left (flushed first, so nothing trickles in)."""
    trace.get_tracer_provider().force_flush()
    SPANS.clear()
    return SPANS


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    base_url: str
    log: Path

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def wait_ready(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llmchat did not become ready; see {self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health").json()["status"] == "ok":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)


def spawn_llmchat(log_dir: Path, env: dict[str, str], wait_ready: bool = True) -> ServerProcess:
    """llmchat as its own process, as in production (its own OpenTelemetry setup, signals, exit code)."""
    port = free_port()
    log = log_dir / "llmchat.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmchat", "serve", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    if wait_ready:
        server.wait_ready()
    return server


def prompt_ids(loaded, text: str) -> list[int]:
    """A one-message chat prompt in the model's own template, as token ids."""
    rendered = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(rendered["input_ids"])


async def drain(engine, seq) -> list[int]:
    """Streams a submitted sequence to its end; its completion's token ids."""
    async for _ in engine.stream(seq):
        pass
    return seq.completion_ids


async def settled(engine) -> dict:
    """/health's view of the engine once its thread has released the last finished sequence's blocks (a stream
    ends before the engine thread drops its sequence)."""
    for _ in range(200):
        if engine.describe()["kv_pool"]["blocks_used"] == 0:
            break
        await asyncio.sleep(0.01)
    return engine.describe()


def run_engine(loaded, config, body, **engine_options):
    """Runs `await body(engine)` on a started llmchat engine over `loaded`, then shuts the engine down."""
    from llmchat.engine import Engine, EngineConfig

    async def main():
        engine = Engine(loaded, EngineConfig(config, **engine_options))
        if engine_options.get("cuda_graphs") or engine_options.get("compile_decode"):
            engine.prepare()  # captured or compiled before serving, as the service does
        engine.start()
        try:
            return await body(engine)
        finally:
            await asyncio.to_thread(engine.shutdown)

    return asyncio.run(main())


def teacher_forced(forward, model, tokenizer, masked: bool = True):
    """Logits of each step of a fixed answer to a fixed question, [steps, vocab] in float32: the prompt
    prefilled, then the answer's tokens decoded one by one through `forward` (any of the runner's passes),
    with the mask or, as the runner passes an unpadded batch, without (`masked=False`)."""
    import torch

    from llmchat.engine.kv_cache import new_cache

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    answer = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    mask, cache = torch.ones_like(ids), new_cache(model)
    with torch.inference_mode():
        forward(ids, mask, torch.arange(ids.shape[1])[None], cache)
        steps = []
        for i, token in enumerate(answer):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            step_mask = mask if masked else None
            steps.append(forward(torch.tensor([[token]]), step_mask, torch.tensor([[ids.shape[1] + i]]), cache).float())
    return torch.cat(steps)


def rounded_inputs(x, byte_inputs: bool):
    """x as the kernel rounds it: each group of 32 as levels -127..127 of a scale that puts its largest magnitude
    at 127, plus (16-bit inputs) the remainders' levels at a 254th of that scale."""
    import torch

    groups = x.view(x.shape[0], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    step = torch.where(scale > 0, scale, 1.0)
    coarse = (groups / step).round()
    fine = torch.zeros_like(coarse) if byte_inputs else ((groups - coarse * scale) / (step / 254)).round()
    return ((coarse + fine / 254) * scale).view_as(x)
