"""Settings every service shares; each service subclasses ServiceSettings with its own env prefix."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    log_level: LogLevel = Field("info", description="Log level.")
    log_json: bool = Field(False, description="Write logs as JSON lines (for journald and log shippers).")
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys; when any are set, /v1 routes need one. Env or EnvironmentFile only.",
    )
    api_key_file: Path | None = Field(None, description="File with one API key per line (# comments allowed).")
    health_requires_key: bool = Field(False, description="Also require a key for /health and /metrics.")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty turns CORS off.")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="Largest request body; larger ones get 413.")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests may take to finish after SIGTERM before the service exits."
    )

    def origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
