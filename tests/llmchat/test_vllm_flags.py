"""vLLM's flag names for `llmchat serve`: each gives the setting our own flag gives, and a value with no
llmchat equivalent stops the command with a usage error that names the accepted values."""

import pytest
import typer
from typer.testing import CliRunner

from llmchat.__main__ import app, serve_flags
from llmchat.settings import Settings


def parse(*args: str) -> dict:
    """The flags `llmchat serve` would build its Settings from, without starting anything."""
    seen: list = []
    probe = typer.Typer()

    @probe.command()
    @serve_flags
    def serve(**flags) -> None:
        seen.append(flags)

    @probe.command()
    def version() -> None:
        pass

    result = CliRunner().invoke(probe, ["serve", *args])
    assert result.exit_code == 0, result.output
    return seen[-1]


@pytest.mark.parametrize(
    ("vllm", "ours", "setting", "value"),
    [
        (["--max-model-len", "4096"], ["--max-context", "4096"], "max_context", 4096),
        (["--max-model-len", "32k"], ["--max-context", "32000"], "max_context", 32000),
        (["--max-model-len", "32K"], ["--max-context", "32768"], "max_context", 32768),
        (["--max-model-len", "25.6k"], ["--max-context", "25600"], "max_context", 25600),
        (["--max-num-seqs", "48"], ["--max-running", "48"], "max_running", 48),
        (["--max-num-batched-tokens", "2048"], ["--max-batched-tokens", "2048"], "max_batched_tokens", 2048),
        (["--max-num-batched-tokens", "8Ki"], ["--max-batched-tokens", "8192"], "max_batched_tokens", 8192),
        (["--tool-call-parser", "hermes"], ["--tool-parser", "hermes"], "tool_parser", "hermes"),
        (["--tool-call-parser", "llama3_json"], ["--tool-parser", "llama3"], "tool_parser", "llama3"),
        (["--tool-call-parser", "llama4_json"], ["--tool-parser", "llama3"], "tool_parser", "llama3"),
        (["--tool-call-parser", "mistral"], ["--tool-parser", "mistral"], "tool_parser", "mistral"),
        (["--allowed-origins", '["*"]'], ["--cors-origins", "*"], "cors_origins", "*"),
        (
            ["--allowed-origins", '["https://a.example", "https://b.example"]'],
            ["--cors-origins", "https://a.example,https://b.example"],
            "cors_origins",
            "https://a.example,https://b.example",
        ),
    ],
)
def test_a_vllm_flag_sets_what_ours_sets(vllm, ours, setting, value):
    assert parse(*vllm) == parse(*ours) == {setting: value}
    assert getattr(Settings(**parse(*vllm)), setting) == value != Settings.model_fields[setting].default


def test_api_key_sets_the_key_the_environment_would(monkeypatch):
    flags = parse("--api-key", "sk-local-1")
    monkeypatch.setenv("LLMCHAT_API_KEYS", "sk-local-1")
    assert Settings(**flags).api_keys.get_secret_value() == Settings().api_keys.get_secret_value() == "sk-local-1"


def test_our_flags_still_take_our_values():
    assert parse("--tool-parser", "auto", "--cors-origins", "https://a.example") == {
        "tool_parser": "auto",
        "cors_origins": "https://a.example",
    }


def test_help_shows_each_vllm_name_beside_ours():
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for pair in (
        "--max-context, --max-model-len",
        "--max-running, --max-num-seqs",
        "--max-batched-tokens, --max-num-batched-tokens",
        "--tool-parser, --tool-call-parser",
        "--cors-origins, --allowed-origins",
    ):
        assert pair in result.output
    assert "--api-key <str>" in result.output and "--api-keys" not in result.output


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["--tool-call-parser", "pythonic"],
            "'pythonic' has no llmchat equivalent; accepted: auto, hermes, llama3, mistral, mistral_args, qwen3_coder, "
            "none, or vLLM's hermes, llama3_json, llama4_json, mistral, qwen3_coder, qwen3_xml",
        ),
        (["--max-model-len", "1M"], "'1M' is not a token count"),
        (["--max-model-len", "auto"], "'auto' is not a token count"),
    ],
)
def test_a_vllm_value_without_an_equivalent_is_a_clear_usage_error(args, error):
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2
    assert error in result.output and "Traceback" not in result.output


def test_enable_auto_tool_choice_is_accepted_and_changes_nothing():
    assert parse("--enable-auto-tool-choice", "--tool-call-parser", "hermes") == parse("--tool-parser", "hermes")
