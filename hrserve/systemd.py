"""systemd integration without libsystemd: sd_notify messages and a watchdog that pings only while healthy.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("hrserve.systemd")
SEND_TIMEOUT_S = 1.0
# Set once STOPPING=1 is sent: EXTEND_TIMEOUT_USEC then extends the stop timeout, not the start's.
stopping = threading.Event()


def notify(*lines: str) -> bool:
    """Sends `READY=1`, `STATUS=...`, `STOPPING=1`, `WATCHDOG=1` ... to the service manager."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if "STOPPING=1" in lines:
        stopping.set()
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram blocks while the manager's queue is full; a busy manager must not stall the caller.
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The watchdog period systemd asked for (WatchdogSec=), if it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


class Watchdog:
    """Pings WATCHDOG=1 at a third of the period while `is_healthy()` holds; stops pinging when it does not,
    so systemd restarts a service whose inference loop hangs, but not one that is merely busy."""

    def __init__(self, is_healthy: Callable[[], bool], interval_s: float | None = None) -> None:
        self.is_healthy = is_healthy
        self.interval_s = interval_s if interval_s is not None else watchdog_interval_s()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.interval_s:
            return
        self._thread = threading.Thread(target=self._run, name="hrserve-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s / 3):
            if self.is_healthy():
                notify("WATCHDOG=1")
            else:
                log.error("not healthy: withholding the systemd watchdog keep-alive")


@contextmanager
def extending_start_timeout(every_s: float = 20.0, by_s: float = 60.0) -> Iterator[None]:
    """While the block runs, asks systemd every `every_s` seconds for `by_s` more seconds of start-up.

    For long work before READY=1 (a first model conversion), so TimeoutStartSec= need only cover a normal
    start. systemd applies each EXTEND_TIMEOUT_USEC only once the start has outrun TimeoutStartSec=, and
    then fails the start `by_s` after the last one. The messages stop when the block ends, not when the
    work stops making progress: a block that hangs keeps the start alive. They also stop at STOPPING=1,
    as systemd would apply them to the stop timeout.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        yield
        return
    message = f"EXTEND_TIMEOUT_USEC={int(by_s * 1_000_000)}"
    done = threading.Event()

    def keep_extending() -> None:
        while not stopping.is_set():
            notify(message)
            if done.wait(every_s):
                return

    thread = threading.Thread(target=keep_extending, name="hrserve-extend-timeout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
