"""Settings every service shares; each service subclasses ServiceSettings with its own env prefix."""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    instance: int | None = Field(
        None,
        ge=0,
        description="Replica number N on this host (systemd unit <service>@N): "
        "the default port becomes the registry port + N.",
    )
    log_level: LogLevel = Field("info", description="Log level.")
    log_json: bool = Field(False, description="Write logs as JSON lines (for journald and log shippers).")
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys; when any are set, /v1 routes, /metrics, /tokenize and /detokenize "
        "need one. Env or EnvironmentFile only.",
    )
    api_key_file: Path | None = Field(None, description="File with one API key per line (# comments allowed).")
    health_requires_key: bool = Field(False, description="Also require a key for /health (/metrics always needs one).")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty turns CORS off.")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="Largest request body; larger ones get 413.")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests may take to finish after SIGTERM before the service exits."
    )

    @model_validator(mode="after")
    def _instance_port(self) -> Self:
        # Only the default moves: a port given by flag, env or env file is meant as written, and 0 (any free
        # port) stays 0.
        if self.instance and "port" not in self.model_fields_set and self.port:
            if self.port + self.instance > 65535:
                raise ValueError(f"instance {self.instance}: port {self.port} + {self.instance} is above 65535")
            self.port += self.instance
        return self

    def origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
