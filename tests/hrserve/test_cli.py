"""`serve` flags generated from a settings model: one per setting, booleans negatable, help from the field's
description, and only the flags given reach the settings (the environment keeps the rest); an alias is another
name for a flag, read into the setting's values."""

from typing import Literal

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from hrserve.cli import Alias, comma_list, setting_flags, single_key
from hrserve.settings import ServiceSettings


class DemoSettings(ServiceSettings):
    max_running: int = Field(16, ge=1, description="Most sequences in one batch.")
    device: Literal["auto", "cpu"] = Field("auto", description="Where to run.")
    prefix_cache: bool = Field(True, description="Reuse earlier prompts.")


ALIASES = {
    "max_running": Alias("--max-num-seqs", "the other server's name"),
    "cors_origins": Alias("--allowed-origins", "also a JSON list", comma_list),
    "api_keys": Alias("--api-key", "One key, visible in ps.", single_key),
}


def cli(seen: list, aliases: dict[str, Alias] | None = None) -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None)

    @app.command()
    @setting_flags(DemoSettings, exclude={"api_keys"}, aliases=aliases)
    def serve(**flags) -> None:
        seen.append(flags)

    @app.command()
    def version() -> None:
        pass

    return app


def test_each_setting_is_a_flag_with_its_description_and_default():
    result = CliRunner().invoke(cli([]), ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--max-running" in result.output and "Most sequences in one batch. [default: 16]" in result.output
    assert "auto | cpu. Where to run. [default: auto]" in result.output
    assert "--prefix-cache / --no-prefix-cache" in result.output
    assert "--api-keys" not in result.output and "--drain-timeout" in result.output


def test_only_given_flags_reach_the_command():
    seen: list = []
    result = CliRunner().invoke(cli(seen), ["serve", "--max-running", "4", "--no-prefix-cache", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen == [{"max_running": 4, "prefix_cache": False, "device": "cpu"}]
    CliRunner().invoke(cli(seen), ["serve"])
    assert seen[-1] == {}


def parse(*args: str) -> dict:
    seen: list = []
    result = CliRunner().invoke(cli(seen, ALIASES), ["serve", *args])
    assert result.exit_code == 0, result.output
    return seen[-1]


def test_an_alias_sits_beside_our_flag_and_an_excluded_setting_gets_only_its_alias():
    result = CliRunner().invoke(cli([], ALIASES), ["serve", "--help"])
    shown = " ".join(result.output.split())  # help wraps at 80 columns
    assert "--max-running, --max-num-seqs " in shown  # the metavar after it differs between typer releases
    assert "Most sequences in one batch. (--max-num-seqs: the other server's name) [default: 16]" in shown
    assert "--api-key <str> One key, visible in ps." in shown and "--api-keys" not in shown


@pytest.mark.parametrize(
    ("alias", "ours"),
    [
        (["--max-num-seqs", "4"], ["--max-running", "4"]),
        (
            ["--allowed-origins", '["https://a.example", "https://b.example"]'],
            ["--cors-origins", "https://a.example,https://b.example"],
        ),
        (["--allowed-origins", '["*"]'], ["--cors-origins", "*"]),
        (["--allowed-origins", "https://a.example"], ["--cors-origins", "https://a.example"]),
    ],
)
def test_an_alias_gives_what_our_flag_gives(alias, ours):
    assert parse(*alias) == parse(*ours) != {}
    assert DemoSettings(**parse(*alias)) == DemoSettings(**parse(*ours)) != DemoSettings()


def test_the_alias_of_a_setting_without_a_flag_sets_it(monkeypatch):
    flags = parse("--api-key", "k-123")
    monkeypatch.setenv("API_KEYS", "k-123")
    assert DemoSettings(**flags).api_keys == DemoSettings().api_keys


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--allowed-origins", '["https://a.example"'], "neither a JSON list of strings nor a comma-separated list"),
        (["--allowed-origins", "[1, 2]"], "neither a JSON list of strings nor a comma-separated list"),
        (["--api-key", "ab,cd"], "takes one key"),
        (["--api-key", " "], "takes one key"),
    ],
)
def test_a_value_an_alias_cannot_read_is_a_usage_error(args, error):
    result = CliRunner().invoke(cli([], ALIASES), ["serve", *args])
    assert result.exit_code == 2
    assert error in result.output and "Traceback" not in result.output
