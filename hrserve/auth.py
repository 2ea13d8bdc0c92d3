"""Optional API keys for a service's /v1 routes, /metrics and the tokenizer's routes: Bearer tokens (and the
header a route's dialect names).

Keys are compared in constant time and never logged. With no keys configured every request passes.
"""

import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr

from hrserve.errors import ServiceError, dialect_for, send_json

log = logging.getLogger("hrserve.auth")


def load_keys(keys: SecretStr | None, key_file: Path | None) -> tuple[bytes, ...]:
    """Keys from a comma-separated setting and/or a file with one key per line (# comments allowed)."""
    found = [k.strip() for k in (keys.get_secret_value() if keys else "").split(",")]
    if key_file is not None:
        found += [line.strip() for line in key_file.read_text().splitlines() if not line.lstrip().startswith("#")]
    return tuple(k.encode() for k in found if k)


def _matches(candidate: bytes, keys: Iterable[bytes]) -> bool:
    # Every key is compared, so the time taken does not say which one (or how much of one) matched.
    return sum(hmac.compare_digest(candidate, key) for key in keys) > 0


class APIKeyMiddleware:
    """Pure ASGI: requests to `protected` path prefixes need a valid key, else 401 in the route's envelope."""

    def __init__(self, app, keys: tuple[bytes, ...], protected: tuple[str, ...] = ("/v1/",)) -> None:
        self.app, self.keys, self.protected = app, keys, protected

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys or not path.startswith(self.protected):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        dialect = dialect_for(scope)
        key_header = dialect.key_header.encode() if dialect.key_header else None
        candidate = None
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            candidate = auth[7:].strip()
        elif key_header in headers:
            candidate = headers[key_header].strip()
        if candidate is not None and _matches(candidate, self.keys):
            await self.app(scope, receive, send)
            return
        reason = "No API key was sent" if candidate is None else "The API key is not valid"
        how = f"an {dialect.key_header} header or " if key_header else ""
        message = f"{reason}: send {how}an 'Authorization: Bearer <key>' header."
        body = ServiceError(401, message, "invalid_request_error", "invalid_api_key").body(dialect)
        await send_json(send, 401, body, {"WWW-Authenticate": "Bearer"})


LOOPBACK = ("127.0.0.1", "::1", "localhost")
# What keys protect beside /v1/*: the metrics, and vLLM's tokenizer routes, which run the model's tokenizer and
# chat template. /health (unless settings say otherwise) and /version stay open, as vLLM leaves them.
PROTECTED = ("/v1/", "/metrics", "/tokenize", "/detokenize")


def install_access_controls(app, settings) -> tuple[bytes, ...]:
    """Body size limit, API keys and (when origins are configured) CORS, in that order from the inside."""
    from starlette.middleware.cors import CORSMiddleware

    from hrserve.limits import BodyLimitMiddleware

    keys = load_keys(settings.api_keys, settings.api_key_file)
    protected = PROTECTED + (("/health",) if settings.health_requires_key else ())
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=keys, protected=protected)
    if settings.origins():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.origins(),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "X-Trace-ID", "X-Span-ID", "X-Client-Job-ID"],
        )
    if keys:
        log.info("API keys required on %s (%d keys)", ", ".join(protected), len(keys))
    elif settings.host not in LOOPBACK:
        log.warning("listening on %s without API keys: anyone who can reach it can use it", settings.host)
    return keys
