"""hrserve: the helpers every service shares (settings, OpenTelemetry, request metadata, errors, logs)."""

from hrserve.auth import install_access_controls
from hrserve.errors import (
    OPENAI,
    Dialect,
    DialectRouter,
    ServiceError,
    bad_request,
    document_errors,
    include_router,
    install_error_handlers,
    not_ready,
)
from hrserve.logging import setup_logging
from hrserve.request import (
    ClientDisconnected,
    RequestIdMiddleware,
    ResponseMetadata,
    cancel_on_disconnect,
    client_job_id,
    validate_client_job_id,
)
from hrserve.serve import Drain, DrainMiddleware, Server
from hrserve.settings import ServiceSettings
from hrserve.spans import OTELContext
from hrserve.systemd import Watchdog, notify
from hrserve.telemetry import instrument_app, setup_otel, shutdown_otel

__all__ = [
    "OPENAI",
    "ClientDisconnected",
    "Dialect",
    "DialectRouter",
    "Drain",
    "DrainMiddleware",
    "OTELContext",
    "RequestIdMiddleware",
    "ResponseMetadata",
    "ServiceError",
    "Server",
    "ServiceSettings",
    "Watchdog",
    "bad_request",
    "cancel_on_disconnect",
    "client_job_id",
    "include_router",
    "document_errors",
    "install_access_controls",
    "install_error_handlers",
    "instrument_app",
    "not_ready",
    "notify",
    "setup_logging",
    "setup_otel",
    "shutdown_otel",
    "validate_client_job_id",
]
