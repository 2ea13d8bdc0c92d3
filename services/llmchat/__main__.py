"""Command line: `llmchat serve` (also `python -m llmchat serve`); the only place Settings() is built."""

import logging
import sys

import typer
import uvicorn
from pydantic import ValidationError

from hrserve import Server, setup_logging
from hrserve.cli import setting_flags
from llmchat.settings import Settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help: rich tables cut long flag names at 80 columns.
    rich_markup_mode=None,
    help="llmchat: OpenAI-compatible chat service.",
)
log = logging.getLogger("llmchat")


@app.command()
# Flags come from the settings model (API keys only from the environment, so they never show in `ps`).
@setting_flags(Settings, exclude={"api_keys"})
def serve(**flags) -> None:
    """Serve the OpenAI-compatible API until stopped; exits non-zero if the model fails to load."""
    from llmchat.server import create_app

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
