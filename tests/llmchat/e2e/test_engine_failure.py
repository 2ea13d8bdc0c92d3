"""A failure inside a generation step ends only that request, in the protocol's error shape."""

import json

import httpx
import pytest
import torch

from llmchat.engine import Engine
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.server import create_app
from llmchat.settings import Settings
from tests.conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 20}


class FailAtStep:
    """Wraps the runner's forward pass to raise once, at the given call."""

    def __init__(self, forward, step: int) -> None:
        self.forward, self.step, self.calls = forward, step, 0
        self.error: Exception = RuntimeError("simulated device fault")

    def __getattr__(self, name: str):
        return getattr(self.forward, name)  # what /health reads of the pass (its kind, its memory)

    def paged(self, *args, **kwargs):  # the runner's one pass a step over the KV pool
        self.calls += 1
        if self.calls == self.step:
            raise self.error
        return self.forward.paged(*args, **kwargs)


@pytest.fixture(scope="module")
def flaky():
    engine = Engine(load_model(ModelConfig("bundled", device="cpu", cache_dir=Settings().cache_dir)))
    fault = FailAtStep(engine.runner.forward, step=0)
    engine.runner.forward = fault
    live = start_server(create_app(Settings(port=0), engine=engine))
    yield live, fault
    live.stop()


def test_stream_reports_error_event_then_done(flaky):
    live, fault = flaky
    fault.calls, fault.step = 0, 4
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=BODY | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "server_error" and "simulated device fault" in error["message"]
    assert any("content" in json.loads(d)["choices"][0]["delta"] for d in data[1:-2])


def test_non_streaming_failure_is_500_envelope_and_engine_keeps_serving(flaky):
    live, fault = flaky
    fault.calls, fault.step = 0, 2
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY, timeout=120)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "generation_error"
    assert "Traceback" not in r.text
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY, timeout=120)
    assert r.status_code == 200
    assert httpx.get(f"{live.base_url}/health").json()["status"] == "ok"


class EngineDeath(BaseException):
    """Escapes the engine loop's `except Exception`, as a fatal fault would."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_thread_fails_in_flight_requests_and_answers_503():
    loaded = load_model(ModelConfig("bundled", device="cpu", cache_dir=Settings().cache_dir))
    engine = Engine(loaded)
    live = start_server(create_app(Settings(port=0), engine=engine))
    try:

        def die() -> None:
            raise EngineDeath

        engine.step = die
        r = httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY, timeout=60)
        assert r.status_code == 500 and "engine died" in r.json()["error"]["message"]
        health = httpx.get(f"{live.base_url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error" and health.json()["engine_alive"] is False
        r = httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY | {"stream": True}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    finally:
        live.stop()


def test_a_device_error_stops_the_engine_so_health_fails_and_systemd_restarts_it():
    """A CUDA error such as a device-side assert leaves the context unusable: every later step would fail while
    /health said ok. The engine stops instead; in-flight requests fail, /health is 503."""
    engine = Engine(load_model(ModelConfig("bundled", device="cpu", cache_dir=Settings().cache_dir)))
    fault = FailAtStep(engine.runner.forward, step=3)
    fault.error = torch.AcceleratorError("CUDA error: device-side assert triggered")
    engine.runner.forward = fault
    live = start_server(create_app(Settings(port=0), engine=engine))
    try:
        r = httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY, timeout=60)
        assert r.status_code == 500 and "Traceback" not in r.text
        health = httpx.get(f"{live.base_url}/health")
        assert health.status_code == 503 and health.json()["engine_alive"] is False
        r = httpx.post(f"{live.base_url}/v1/chat/completions", json=BODY, timeout=60)
        assert r.status_code == 503
    finally:
        live.stop()
