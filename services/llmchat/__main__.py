"""Command line: `llmchat serve` (also `python -m llmchat serve`); the only place Settings() is built."""

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from hrserve import Server, setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help: rich tables cut long flag names at 80 columns.
    rich_markup_mode=None,
    help="llmchat: OpenAI-compatible chat service.",
)
log = logging.getLogger("llmchat")

# Each flag mirrors a setting; an unset flag leaves the LLMCHAT_* environment (or the default) in charge.
Opt = typer.Option


@app.command()
def serve(
    model: Annotated[str | None, Opt(help="Hub repo id, model directory, .gguf file, or 'bundled'.")] = None,
    host: Annotated[str | None, Opt(help="Address to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, Opt(help="Port to listen on [default: from hrserve/registry.toml, 2020].")] = None,
    instance: Annotated[int | None, Opt(help="Replica N (unit llmchat@N): default port 2020+N.")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda.")] = None,
    dtype: Annotated[str | None, Opt(help="auto | float32 | bfloat16 | float16.")] = None,
    quantization: Annotated[str | None, Opt(help="auto | none | nf4 | int8.")] = None,
    forward: Annotated[str | None, Opt(help="auto (fused for Llama-family models) | transformers.")] = None,
    cuda_graphs: Annotated[
        bool | None, Opt("--cuda-graphs/--no-cuda-graphs", help="Decode steps from CUDA graphs (GPU only).")
    ] = None,
    device_map: Annotated[str | None, Opt(help="single | auto | balanced | balanced_low_0 | sequential.")] = None,
    max_memory: Annotated[str | None, Opt(help="Per-device caps for a device map: 0=20GiB,1=20GiB,cpu=64GiB.")] = None,
    offload_dir: Annotated[Path | None, Opt(help="Where a device map puts layers on disk.")] = None,
    max_context: Annotated[int | None, Opt(help="Context limit in tokens [default: the model's].")] = None,
    served_model_name: Annotated[str | None, Opt(help="Model name clients use.")] = None,
    max_running: Annotated[int | None, Opt(help="Most sequences in one batch [default: 16].")] = None,
    max_batched_tokens: Annotated[int | None, Opt(help="Token budget of one engine step [default: 512].")] = None,
    prefix_cache: Annotated[
        bool | None, Opt("--prefix-cache/--no-prefix-cache", help="Reuse the KV of earlier prompts [default: on].")
    ] = None,
    prefix_cache_mb: Annotated[int | None, Opt(help="Prefix cache bound in MiB [default: from free memory].")] = None,
    max_waiting: Annotated[int | None, Opt(help="Queue bound; beyond it 429 [default: 64].")] = None,
    tool_parser: Annotated[str | None, Opt(help="auto | hermes | llama3 | mistral.")] = None,
    validate_tool_names: Annotated[
        bool | None, Opt("--validate-tool-names/--no-validate-tool-names", help="Drop calls to tools not offered.")
    ] = None,
    tool_prompt: Annotated[Path | None, Opt(help="Jinja file replacing the built-in tool prompt.")] = None,
    chat_template: Annotated[Path | None, Opt(help="Jinja chat template replacing the model's.")] = None,
    reasoning_parser: Annotated[str | None, Opt(help="<think> reasoning: auto | think | none.")] = None,
    cache_dir: Annotated[Path | None, Opt(help="Cache for converted weights.")] = None,
    log_level: Annotated[str | None, Opt(help="debug | info | warning | error.")] = None,
    log_json: Annotated[bool | None, Opt("--log-json/--no-log-json", help="JSON log lines.")] = None,
    api_key_file: Annotated[Path | None, Opt(help="File of API keys, one per line (keys: LLMCHAT_API_KEYS).")] = None,
    health_requires_key: Annotated[
        bool | None, Opt("--health-requires-key/--no-health-requires-key", help="Keys for /health too.")
    ] = None,
    cors_origins: Annotated[str | None, Opt(help="Comma-separated CORS origins [default: CORS off].")] = None,
    max_body_bytes: Annotated[int | None, Opt(help="Largest request body in bytes [default: 8 MiB].")] = None,
    trust_remote_code: Annotated[
        bool | None, Opt("--trust-remote-code/--no-trust-remote-code", help="Run a hub model's own code.")
    ] = None,
    drain_timeout: Annotated[float | None, Opt(help="Seconds to finish requests after SIGTERM [default: 30].")] = None,
) -> None:
    """Serve the OpenAI-compatible API until stopped; exits non-zero if the model fails to load."""
    flags = {name: value for name, value in locals().items() if value is not None}
    from pydantic import ValidationError

    from llmchat.server import create_app
    from llmchat.settings import Settings

    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        for err in exc.errors():
            typer.echo(f"llmchat: invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level, settings.log_json)
    web = create_app(settings)
    config = uvicorn.Config(
        web,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = Server(config, web.state.drain)

    def stop() -> None:
        server.should_exit = True

    web.state.runtime.on_load_failure = stop
    log.info("llmchat listening on http://%s:%d (model %s)", settings.host, settings.port, settings.model)
    server.run()
    if web.state.runtime.status == "error":
        log.error("exiting: %s", web.state.runtime.error)
        sys.exit(1)


@app.command()
def version() -> None:
    """Print the version."""
    from llmchat import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
