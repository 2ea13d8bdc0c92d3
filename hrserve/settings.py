"""Settings every service shares; each service subclasses ServiceSettings with its own env prefix."""

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    log_level: LogLevel = Field("info", description="Log level.")
    log_json: bool = Field(False, description="Write logs as JSON lines (for journald and log shippers).")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests may take to finish after SIGTERM before the service exits."
    )
