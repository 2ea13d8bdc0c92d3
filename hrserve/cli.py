"""A service's `serve` flags generated from its settings model, so names, types, help and defaults have one
source: the flag --max-running sets the setting max_running, its help is the setting's description."""

import inspect
from collections.abc import Callable, Collection
from types import NoneType, UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings


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


def setting_flags(settings: type[BaseSettings], exclude: Collection[str] = ()) -> Callable[[Callable], Callable]:
    """Gives a typer command one flag per setting (booleans as --x/--no-x), each None unless given, so an unset
    flag leaves the environment or the default in charge; the command receives the given ones as keywords."""

    def decorate(command: Callable) -> Callable:
        parameters = []
        for name, field in settings.model_fields.items():
            if name in exclude:
                continue
            kind, values = _plain(field.annotation)
            flag = "--" + name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
            option = typer.Option(*decls, help=values + (field.description or "") + _default(field), show_default=False)
            parameters.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
                )
            )

        def run(**flags) -> None:
            command(**{name: value for name, value in flags.items() if value is not None})

        run.__signature__ = inspect.Signature(parameters)
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        return run

    return decorate
