"""`serve` flags generated from a settings model: one per setting, booleans negatable, help from the field's
description, and only the flags given reach the settings (the environment keeps the rest)."""

from typing import Literal

import typer
from pydantic import Field
from typer.testing import CliRunner

from hrserve.cli import setting_flags
from hrserve.settings import ServiceSettings


class DemoSettings(ServiceSettings):
    max_running: int = Field(16, ge=1, description="Most sequences in one batch.")
    device: Literal["auto", "cpu"] = Field("auto", description="Where to run.")
    prefix_cache: bool = Field(True, description="Reuse earlier prompts.")


def cli(seen: list) -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None)

    @app.command()
    @setting_flags(DemoSettings, exclude={"api_keys"})
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
