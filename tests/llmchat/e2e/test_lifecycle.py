"""Start-up and failure: 503 while loading, 503 after a failed load, non-zero exit from the CLI."""

import subprocess
import sys
import threading

import httpx
import pytest
from pydantic import SecretStr

from llmchat import lifecycle
from llmchat import server as server_module
from llmchat.engine.loader import ModelLoadError
from llmchat.settings import Settings
from tests.conftest import start_server

BODY = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]}


def test_503_while_loading_then_error_after_failed_load(monkeypatch):
    release = threading.Event()

    def slow_failing_load(config, on_stage, **options):
        on_stage("pretending to load")
        release.wait(30)
        raise ModelLoadError("weights are corrupt")

    monkeypatch.setattr(lifecycle, "load_model", slow_failing_load)
    live = start_server(server_module.create_app(Settings(port=0)), wait_ready=False)
    try:
        for _ in range(100):
            if (health := httpx.get(f"{live.base_url}/health")).json()["stage"] != "starting":
                break
            threading.Event().wait(0.05)
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        assert health.json()["stage"] == "pretending to load"
        for r in (
            httpx.get(f"{live.base_url}/v1/models"),
            httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY),
            httpx.post(f"{live.base_url}/tokenize", json=BODY),
            httpx.post(f"{live.base_url}/detokenize", json={"tokens": [1]}),
        ):
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "model_not_ready"
            assert r.headers["retry-after"]
        release.set()
        for _ in range(100):
            if (health := httpx.get(f"{live.base_url}/health")).json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert health.status_code == 503
        assert health.json()["status"] == "error"
        assert "weights are corrupt" in health.json()["error"]
        r = httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY)
        assert r.status_code == 503
        assert "weights are corrupt" in r.json()["error"]["message"]
    finally:
        release.set()
        live.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {"OTEL_SDK_DISABLED": "true", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "llmchat", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_exits_non_zero_when_model_fails_to_load(tmp_path):
    result = run_cli("serve", "--model", str(tmp_path / "missing.gguf"), "--port", "0")
    assert result.returncode == 1
    assert "missing.gguf does not exist" in result.stderr


@pytest.mark.parametrize("args", [["--port", "70000"], ["--device", "tpu"], ["--quantization", "fp3"]])
def test_cli_rejects_bad_settings(args):
    result = run_cli("serve", *args)
    assert result.returncode == 2
    assert "invalid setting" in result.stderr


def test_cli_help_lists_every_setting():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for name, field in Settings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        if field.annotation == SecretStr | None:
            # Secrets come from the environment (an EnvironmentFile), never argv, which `ps` shows.
            assert flag not in result.stdout
        else:
            assert flag in result.stdout
