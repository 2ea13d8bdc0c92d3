"""sd_notify through a real datagram socket standing in for systemd's: start-timeout extensions while slow
start-up work runs, and nothing at all outside systemd."""

import socket
import threading
import time

import pytest

from hrserve.systemd import extending_start_timeout, notify


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    # Each test starts a fresh service: one that has not sent STOPPING=1.
    monkeypatch.setattr("hrserve.systemd.stopping", threading.Event())
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket) -> list[str]:
    """The messages already waiting on `sock`."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(5)


def test_notify_reaches_the_socket(notify_socket):
    assert notify("READY=1", "STATUS=ready")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=ready"


def test_start_timeout_is_extended_while_the_work_runs(notify_socket):
    with extending_start_timeout(every_s=0.05, by_s=60):
        # At once, before the first period has passed: the work may already be near the start timeout.
        assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=60000000"
        time.sleep(0.3)
    during = received(notify_socket)
    assert len(during) >= 3 and set(during) == {"EXTEND_TIMEOUT_USEC=60000000"}
    time.sleep(0.2)
    assert received(notify_socket) == [], "still extending after the work ended"


def test_the_extension_stops_when_the_service_stops(notify_socket):
    """Sent after STOPPING=1, an extension would lengthen the stop timeout instead."""
    with extending_start_timeout(every_s=0.05):
        assert notify_socket.recv(4096).startswith(b"EXTEND_TIMEOUT_USEC=")
        notify("STOPPING=1")
        time.sleep(0.1)  # the extender wakes at most once more and sees the service stopping
        received(notify_socket)
        time.sleep(0.2)
        assert received(notify_socket) == [], "still extending after STOPPING=1"


def test_the_extension_stops_when_the_work_fails(notify_socket):
    with pytest.raises(RuntimeError), extending_start_timeout(every_s=0.05):
        raise RuntimeError("conversion failed")
    assert not any(t.name == "hrserve-extend-timeout" for t in threading.enumerate())


def test_nothing_is_sent_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with extending_start_timeout(every_s=0.01):
        assert not any(t.name == "hrserve-extend-timeout" for t in threading.enumerate())
    assert not notify("READY=1")


def test_a_manager_that_stops_reading_does_not_stall_the_caller(notify_socket, monkeypatch):
    monkeypatch.setattr("hrserve.systemd.SEND_TIMEOUT_S", 0.05)
    results = []
    # Nothing reads the socket, so its queue fills after a few datagrams.
    sender = threading.Thread(target=lambda: results.extend(notify("WATCHDOG=1") for _ in range(30)), daemon=True)
    sender.start()
    sender.join(timeout=20)
    assert not sender.is_alive(), "notify blocked on a full queue"
    assert results[0] and not results[-1]
