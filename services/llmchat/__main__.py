"""Command line: `llmchat serve` (also `python -m llmchat serve`); the only place Settings() is built."""

import logging
import re
import sys
from typing import get_args

import typer
import uvicorn
from pydantic import ValidationError

from hrserve import Server, setup_logging
from hrserve.cli import Alias, comma_list, setting_flags, single_key
from llmchat.settings import Settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help: rich tables cut long flag names at 80 columns.
    rich_markup_mode=None,
    help="llmchat: OpenAI-compatible chat service.",
)
log = logging.getLogger("llmchat")

TOOL_PARSERS = get_args(Settings.model_fields["tool_parser"].annotation)
# vLLM's --tool-call-parser names whose syntax one of ours parses; its others have no equivalent here.
VLLM_TOOL_PARSERS = {
    "hermes": "hermes",
    "llama3_json": "llama3",
    "llama4_json": "llama3",
    "mistral": "mistral",
    "qwen3_coder": "qwen3_coder",
    "qwen3_xml": "qwen3_coder",
}


def token_count(value: str) -> int:
    """8192, or vLLM's 32k (32000) and 32K or 32Ki (32768): the suffixes that mean the same in every vLLM
    release (M and G changed meaning between them)."""
    if found := re.fullmatch(r"(\d+)(K|Ki)?|(\d+(?:\.\d+)?)k", value.strip()):
        whole, binary, decimal = found.groups()
        return int(float(decimal) * 1000) if decimal else int(whole) * (1024 if binary else 1)
    raise typer.BadParameter(f"{value!r} is not a token count such as 8192, 32k (32000) or 32K (32768)")


def tool_parser_name(value: str) -> str:
    if value in TOOL_PARSERS:
        return value
    if value in VLLM_TOOL_PARSERS:
        return VLLM_TOOL_PARSERS[value]
    raise typer.BadParameter(
        f"{value!r} has no llmchat equivalent; accepted: {', '.join(TOOL_PARSERS)}, "
        f"or vLLM's {', '.join(VLLM_TOOL_PARSERS)}"
    )


# vLLM's names for our flags, so these stay as written when a unit or script moves from `vllm serve`.
VLLM_FLAGS = {
    "max_context": Alias("--max-model-len", "vLLM's name; also 32k = 32000, 32K = 32768", token_count),
    "max_running": Alias("--max-num-seqs", "vLLM's name"),
    "max_batched_tokens": Alias(
        "--max-num-batched-tokens",
        "vLLM's name, nearly the same: vLLM puts no time cap on chunks; also 8k, 8K",
        token_count,
    ),
    "tool_parser": Alias(
        "--tool-call-parser",
        "vLLM's name; its hermes and mistral are ours, its llama3_json and llama4_json our llama3, and it has "
        "no others here",
        tool_parser_name,
    ),
    "api_keys": Alias(
        "--api-key",
        "vLLM's flag: one API key, in place of LLMCHAT_API_KEYS (the same routes need it). It shows in `ps`: "
        "prefer LLMCHAT_API_KEYS or --api-key-file.",
        single_key,
    ),
    "cors_origins": Alias("--allowed-origins", "vLLM's name; also a JSON list such as '[\"*\"]'", comma_list),
}


# Flags come from the settings model (API keys only from the environment, so they never show in `ps`, unless
# vLLM's --api-key is given).
serve_flags = setting_flags(
    Settings,
    exclude={"api_keys"},
    aliases=VLLM_FLAGS,
    no_ops={"--enable-auto-tool-choice": "vLLM's switch; tool calling is always on here, so it changes nothing"},
)


@app.command()
@serve_flags
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
    if "api_keys" in flags:
        log.warning("an API key given by --api-key shows in `ps`; LLMCHAT_API_KEYS in an EnvironmentFile does not")
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
