"""Per-request metadata: request ids and access logs (pure ASGI), client_job_id, response headers."""

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hrserve.errors import bad_request

log = logging.getLogger("hrserve.access")
T = TypeVar("T")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

CLIENT_JOB_ID_HEADER = "X-Client-Job-ID"
CLIENT_JOB_ID_PARAM = "client_job_id"
CLIENT_JOB_ID_MAX = 128
_CLIENT_JOB_ID = re.compile(r"[A-Za-z0-9._:-]+")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def validate_client_job_id(header: str | None, query: str | None) -> str | None:
    """The caller's job id from the header or the query string, or None when neither is given.

    Only letters, digits and `._:-`, at most 128 characters: the value is echoed in a response
    header and written to logs and spans, so anything else is refused with a 400.
    """
    if header is not None and query is not None and header != query:
        raise bad_request(
            f"{CLIENT_JOB_ID_HEADER} header and {CLIENT_JOB_ID_PARAM} query parameter differ; send one of them.",
            CLIENT_JOB_ID_PARAM,
        )
    value = header if header is not None else query
    if value is None:
        return None
    if not 0 < len(value) <= CLIENT_JOB_ID_MAX or not _CLIENT_JOB_ID.fullmatch(value):
        raise bad_request(
            f"client_job_id must be 1-{CLIENT_JOB_ID_MAX} characters of letters, digits and '._:-'.",
            CLIENT_JOB_ID_PARAM,
            "invalid_client_job_id",
        )
    return value


def client_job_id(request: Request) -> str | None:
    """FastAPI dependency form of validate_client_job_id."""
    return validate_client_job_id(
        request.headers.get(CLIENT_JOB_ID_HEADER), request.query_params.get(CLIENT_JOB_ID_PARAM)
    )


@dataclass(slots=True)
class ResponseMetadata:
    """What a response reports about itself in headers, so the JSON body stays pure protocol."""

    trace_id: str | None = None
    span_id: str | None = None
    client_job_id: str | None = None

    def headers(self) -> dict[str, str]:
        pairs = {"X-Trace-ID": self.trace_id, "X-Span-ID": self.span_id, CLIENT_JOB_ID_HEADER: self.client_job_id}
        return {k: v for k, v in pairs.items() if v}


class RequestIdMiddleware:
    """Gives every HTTP request an id (the caller's X-Request-ID if sane), echoes it, logs one access line.

    Health checks are not logged: a load balancer or systemd probe would drown everything else.

    Pure ASGI rather than BaseHTTPMiddleware, which would buffer streaming responses.
    """

    def __init__(self, app: ASGIApp, quiet_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in self.quiet_paths:
                log.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    scope["path"],
                    status,
                    (time.perf_counter() - start) * 1000,
                    extra={"status": status, "path": scope["path"]},
                )
            request_id_var.reset(token)


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client hangs up first (then raises ClientDisconnected).

    Only for handlers that have read their whole body: after that, the next ASGI message can only be
    the disconnect, so waiting for it costs nothing.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()
