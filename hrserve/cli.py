"""A service's `serve` flags generated from its settings model, so names, types, help and defaults have one
source: the flag --max-running sets the setting max_running, its help is the setting's description. A service may
also accept another server's name for a flag (an Alias), so that flag stays as written in a unit moved over."""

import inspect
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings


@dataclass(frozen=True)
class Alias:
    """Another name for a setting's flag. `read` turns a value as typed into the setting's value; since both
    names share one option it sees our own values too and must pass them through. `note` says what differs."""

    flag: str
    note: str
    read: Callable[[str], Any] | None = None


def comma_list(value: str) -> str:
    """A comma-separated list as typed, or a JSON list of strings (vLLM's form, '["*"]') joined with commas."""
    if not value.lstrip().startswith("["):
        return value
    try:
        items = json.loads(value)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise typer.BadParameter(f"{value!r} is neither a JSON list of strings nor a comma-separated list")
    return ",".join(items)


def single_key(value: str) -> str:
    # The keys setting splits on commas, so "ab,cd" would let in "ab" and "cd" alone: weaker keys than the
    # one the operator typed.
    if not value.strip() or "," in value:
        raise typer.BadParameter("takes one key, not empty and without commas (several go in the environment)")
    return value.strip()


def _plain(annotation) -> tuple[type, str]:
    """The flag's type and a note on its values, from a field's annotation (X | None is X)."""
    if get_origin(annotation) in (Union, UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not NoneType]
    if get_origin(annotation) is Literal:
        return str, " | ".join(map(str, get_args(annotation))) + ". "
    return annotation, ""


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None or value is False or value == "":
        return ""
    return f" [default: {'on' if value is True else value}]"


def _option(name: str, field: FieldInfo, alias: Alias | None, own_flag: bool) -> tuple[type, Any]:
    """A setting's flag type and typer option: our flag and/or its alias, help from the description."""
    kind, values = _plain(field.annotation)
    flag = "--" + name.replace("_", "-")
    decls = ([f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]) if own_flag else []
    if alias is None:
        return kind, typer.Option(*decls, help=values + (field.description or "") + _default(field), show_default=False)
    # Alone, the alias's note is the whole help; beside our flag it follows our description.
    text = values + (field.description or "") + f" ({alias.flag}: {alias.note})" + _default(field)
    read = {"parser": alias.read, "metavar": "<int>" if kind is int else "<str>"} if alias.read else {}
    return kind, typer.Option(*decls, alias.flag, help=text if own_flag else alias.note, show_default=False, **read)


def setting_flags(
    settings: type[BaseSettings],
    exclude: Collection[str] = (),
    aliases: Mapping[str, Alias] | None = None,
    no_ops: Mapping[str, str] | None = None,
) -> Callable[[Callable], Callable]:
    """Gives a typer command one flag per setting (booleans as --x/--no-x), each None unless given, so an unset
    flag leaves the environment or the default in charge; the command receives the given ones as keywords.
    `exclude` names settings without a flag of their own; an alias in `aliases` (by setting) still adds one.
    `no_ops` are another server's switches for what is always on here (flag: help): accepted, and dropped."""
    aliases, no_ops = aliases or {}, no_ops or {}

    def decorate(command: Callable) -> Callable:
        parameters = []
        for name, field in settings.model_fields.items():
            alias, own_flag = aliases.get(name), name not in exclude
            if not (own_flag or alias):
                continue
            kind, option = _option(name, field, alias, own_flag)
            parameters.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
                )
            )

        dropped = {flag.lstrip("-").replace("-", "_"): flag for flag in no_ops}
        for name, flag in dropped.items():
            option = typer.Option(flag, help=no_ops[flag], show_default=False)
            parameters.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, option]
                )
            )

        def run(**flags) -> None:
            command(**{name: value for name, value in flags.items() if value is not None and name not in dropped})

        run.__signature__ = inspect.Signature(parameters)
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        return run

    return decorate
