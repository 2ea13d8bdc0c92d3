"""ServiceError and the handlers that turn every failure into the error envelope of the route's protocol:
OpenAI's everywhere, Anthropic's under /v1/messages (where Anthropic SDKs parse it)."""

import json
import logging
import os
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException

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

    def body(self, path: str = "") -> dict:
        """The envelope for a request to `path`."""
        if path.startswith(ANTHROPIC_PATHS):
            return {"type": "error", "error": {"type": _anthropic_type(self.status), "message": self.message}}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Routes that speak Anthropic's Messages API, and its error types by status.
ANTHROPIC_PATHS = ("/v1/messages",)
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def _anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


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


async def send_error(send, error: ServiceError, path: str = "") -> None:
    await send_json(send, error.status, error.body(path), error.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        trace.get_current_span().set_attribute("error.type", exc.code or exc.type)
        return JSONResponse(exc.body(request.url.path), status_code=exc.status, headers=exc.headers)

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
        return JSONResponse(err.body(request.url.path), status_code=500)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
ERROR_ENVELOPE_SCHEMA = {
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
}
ANTHROPIC_ENVELOPE_SCHEMA = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
ERROR_STATUSES = {
    "400": "The request is invalid; `param` names the field.",
    "401": "An API key is required and was missing or wrong.",
    "404": "No such model or route.",
    "413": "The request body is over the size limit.",
    "429": "The server is at capacity; retry after `Retry-After` seconds.",
    "500": "An internal error (logged, never detailed here).",
    "503": "The model is not ready, or the server is shutting down; see `Retry-After`.",
}


def document_errors(app: FastAPI, prefix: str = "/v1/") -> None:
    """Makes /openapi.json tell the truth about errors: the envelope and statuses routes under `prefix`
    really answer, and no FastAPI-default 422 (validation failures are 400 here)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorEnvelope"] = ERROR_ENVELOPE_SCHEMA
        schemas["AnthropicErrorEnvelope"] = ANTHROPIC_ENVELOPE_SCHEMA
        for path, operations in schema.get("paths", {}).items():
            envelope = "AnthropicErrorEnvelope" if path.startswith(ANTHROPIC_PATHS) else "ErrorEnvelope"
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{envelope}"}}}
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith(prefix):
                    for status, description in ERROR_STATUSES.items():
                        responses.setdefault(status, {"description": description, "content": body})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
