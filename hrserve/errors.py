"""ServiceError and the handlers that turn every failure into the error body of the route's protocol: OpenAI's
unless the route's router speaks another dialect (DialectRouter), even for errors middleware raises before
routing."""

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException
from starlette.routing import Match

log = logging.getLogger("hrserve.errors")


@dataclass
class ServiceError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def body(self, dialect: "Dialect | None" = None) -> dict:
        """The error as `dialect` writes it (OpenAI's by default)."""
        return (dialect or OPENAI).build(self)


@dataclass(frozen=True, slots=True)
class Dialect:
    """How a protocol's routes speak where every route of a service differs: its error body (and that body's
    JSON schema, `name` in /openapi.json), and the header besides `Authorization` its SDKs send keys in."""

    name: str
    schema: dict
    build: Callable[[ServiceError], dict]
    key_header: str | None = None


_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
OPENAI = Dialect(
    "ErrorEnvelope",
    {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _NULLABLE_STRING,
                    "code": _NULLABLE_STRING,
                },
            }
        },
    },
    lambda e: {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
)


class DialectRouter(APIRouter):
    """A router whose routes speak `dialect`: their validation and handler errors, and those of the middleware
    in front of them (API keys, body limit, draining), once the app includes it with include_router()."""

    def __init__(self, dialect: Dialect, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dialect = dialect


def include_router(app: FastAPI, router: APIRouter) -> None:
    """app.include_router(), remembering a DialectRouter so the app knows which routes speak its dialect."""
    app.include_router(router)
    if isinstance(router, DialectRouter):
        app.state.dialect_routers = [*getattr(app.state, "dialect_routers", []), router]


def _dialect_routers(app) -> list[DialectRouter]:
    return getattr(app.state, "dialect_routers", []) if app is not None else []


def dialect_for(scope) -> Dialect:
    """The dialect of the route that serves (or would, but for the method) the request in `scope`."""
    for router in _dialect_routers(scope.get("app")):
        if any(route.matches(scope)[0] is not Match.NONE for route in router.routes):
            return router.dialect
    return OPENAI


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServiceError:
    return ServiceError(400, message, "invalid_request_error", code, param)


def not_ready(message: str) -> ServiceError:
    return ServiceError(503, message, "service_unavailable", "model_not_ready", headers={"Retry-After": "5"})


_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def _error_type(status: int) -> str:
    return _STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def validation_error(exc: RequestValidationError) -> ServiceError:
    """One 400 for a failed request model: the field path as `param`, the most telling message."""
    errors = exc.errors() or [{"loc": (), "msg": "Invalid request", "type": "value_error"}]
    # FastAPI prefixes body fields with "body"; OpenAI's `param` is the field path (messages.0.role).
    locs = [tuple(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
    # A value that fits no member of a union yields one error per member, each with the member's
    # name in its path; what they share is the field the caller got wrong.
    loc = tuple(os.path.commonprefix(locs)) or locs[0]
    param = ".".join(loc) or None
    best = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    if best.get("type") == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {best.get('ctx', {}).get('error', best['msg'])}")
    message = f"Invalid value for '{param}': {best['msg']}" if param else str(best["msg"])
    return bad_request(message, param)


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    """A whole JSON response from pure ASGI middleware (which runs outside FastAPI's handlers)."""
    raw = [(b"content-type", b"application/json")] + [
        (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def send_error(send, error: ServiceError, scope) -> None:
    """The error in the dialect of the route `scope` is for (middleware runs before routing)."""
    await send_json(send, error.status, error.body(dialect_for(scope)), error.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        trace.get_current_span().set_attribute("error.type", exc.code or exc.type)
        return JSONResponse(exc.body(dialect_for(request.scope)), status_code=exc.status, headers=exc.headers)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await on_service_error(request, validation_error(exc))

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None)  # set by our own HTTPException subclasses
        err = ServiceError(exc.status_code, str(exc.detail), _error_type(exc.status_code), code)
        err.headers = dict(exc.headers) if exc.headers else None
        return await on_service_error(request, err)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log and the span, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        span = trace.get_current_span()
        span.record_exception(exc)
        span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
        err = ServiceError(500, "The server had an internal error. It has been logged.", "server_error")
        return JSONResponse(err.body(dialect_for(request.scope)), status_code=500)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


ERROR_STATUSES = {
    "400": "The request is invalid; `param` names the field.",
    "401": "An API key is required and was missing or wrong.",
    "404": "No such model or route.",
    "413": "The request body is over the size limit.",
    "429": "The server is at capacity; retry after `Retry-After` seconds.",
    "500": "An internal error (logged, never detailed here).",
    "503": "The model is not ready, or the server is shutting down; see `Retry-After`.",
}


def document_errors(app: FastAPI, prefixes: tuple[str, ...] = ("/v1/",)) -> None:
    """Makes /openapi.json tell the truth about errors: the envelope and statuses routes under `prefixes`
    really answer, and no FastAPI-default 422 (validation failures are 400 here)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        dialects = {route.path: router.dialect for router in _dialect_routers(app) for route in router.routes}
        for path, operations in schema.get("paths", {}).items():
            dialect = dialects.get(path, OPENAI)
            schemas[dialect.name] = dialect.schema
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{dialect.name}"}}}
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith(prefixes):
                    for status, description in ERROR_STATUSES.items():
                        responses.setdefault(status, {"description": description, "content": body})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
