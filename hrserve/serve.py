"""Serving under uvicorn with a graceful drain.

On SIGTERM (systemctl stop) the service tells systemd it is stopping, answers new requests with 503 and
Retry-After, lets in-flight ones (streams included) finish for up to `drain_timeout` seconds, then
shuts down and exits 0. A second signal stops at once.
"""

import logging
import time
from dataclasses import dataclass

import uvicorn

from hrserve.errors import ServiceError, send_error
from hrserve.systemd import notify

log = logging.getLogger("hrserve.serve")


@dataclass(slots=True)
class Drain:
    """In-flight request count and draining state, shared by DrainMiddleware and Server."""

    timeout_s: float = 30.0
    num_in_flight: int = 0
    is_draining: bool = False
    deadline: float = 0.0

    def begin(self) -> None:
        self.is_draining = True
        self.deadline = time.monotonic() + self.timeout_s

    def is_done(self) -> bool:
        return self.num_in_flight == 0 or time.monotonic() >= self.deadline


class DrainMiddleware:
    """Pure ASGI: counts requests while they run (a stream until its last byte); refuses new ones when draining."""

    def __init__(self, app, drain: Drain, exempt: tuple[str, ...] = ("/health",)) -> None:
        self.app, self.drain, self.exempt = app, drain, exempt

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.drain.is_draining:
            await send_error(send, SHUTTING_DOWN, scope)
            return
        self.drain.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.num_in_flight -= 1


SHUTTING_DOWN = ServiceError(
    503,
    "The server is shutting down; retry shortly or on another replica.",
    "service_unavailable",
    "shutting_down",
    headers={"Retry-After": "5", "Connection": "close"},
)


class Server(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping, and which exits 0 afterwards
    (uvicorn re-raises the signal it caught, which systemd reports as status 143)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        if self.drain.is_draining:
            log.warning("second stop signal: exiting without waiting for %d requests", self.drain.num_in_flight)
            self.should_exit = self.force_exit = True
            return
        log.info(
            "stop requested: draining %d in-flight requests (up to %.0fs)",
            self.drain.num_in_flight,
            self.drain.timeout_s,
        )
        notify("STOPPING=1", f"STATUS=draining {self.drain.num_in_flight} requests")
        self.drain.begin()
        if not self.started:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain.is_draining and not self.should_exit and self.drain.is_done():
            if self.drain.num_in_flight:
                log.warning("drain timeout: stopping with %d requests still running", self.drain.num_in_flight)
            self.should_exit = True
        return await super().on_tick(counter)
