"""llmchat under a service manager's eyes: READY=1 after warm-up, STATUS while loading, watchdog
keep-alives, and SIGTERM draining in-flight streams before a clean exit 0."""

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import spawn_llmchat

MODEL = "SmolLM2-135M-Instruct"


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; records (time, line) pairs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.lines: list[tuple[float, str]] = []
        self.on_ready: list = []
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            for line in data.splitlines():
                if line == "READY=1":
                    for callback in self.on_ready:
                        callback()
                self.lines.append((time.monotonic(), line))

    def wait_for(self, line: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, seen in list(self.lines):
                if seen == line:
                    return at
            time.sleep(0.05)
        raise AssertionError(f"{line!r} never arrived; got {[line for _, line in self.lines]}")

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def managed(tmp_path):
    """llmchat started as systemd would: its own process, NOTIFY_SOCKET and WATCHDOG_USEC set."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {
        "OTEL_SDK_DISABLED": "true",
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "3000000",
        "LLMCHAT_DRAIN_TIMEOUT": "60",
    }
    health_at_ready: list[dict] = []
    server = None
    notify.on_ready.append(lambda: health_at_ready.append(httpx.get(f"{server.base_url}/health").json()))
    server = spawn_llmchat(tmp_path, env, wait_ready=False)
    try:
        yield server.proc, notify, server.base_url, health_at_ready
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
        notify.close()


def test_ready_only_after_health_is_ok_with_status_lines_before(managed):
    proc, notify, base_url, health_at_ready = managed
    ready_at = notify.wait_for("READY=1", 900)
    assert health_at_ready and health_at_ready[0]["status"] == "ok"
    statuses = [line for at, line in notify.lines if line.startswith("STATUS=") and at < ready_at]
    assert any("warming up" in s for s in statuses), statuses
    assert any("loading" in s.lower() or "weights" in s.lower() for s in statuses), statuses
    assert [line for _, line in notify.lines if line.startswith("STATUS=ready")]
    # The watchdog (WATCHDOG_USEC=3 s) is fed about once a second while the engine loop turns.
    time.sleep(3.5)
    assert sum(line == "WATCHDOG=1" for _, line in notify.lines) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_sigterm_drains_the_running_stream_then_exits_zero(managed):
    proc, notify, base_url, _ = managed
    notify.wait_for("READY=1", 900)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    break
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 10)
        refused = httpx.post(f"{base_url}/v1/chat/completions", json=body | {"stream": False}, timeout=10)
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{base_url}/health").json()["status"] == "draining"
        events += [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"]]
    assert finish[-1] == "length", "the stream ran to its end"
    assert proc.wait(30) == 0
