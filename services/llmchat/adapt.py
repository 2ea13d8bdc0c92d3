"""Checks every protocol adapter makes the same way, each naming the fields in its own wire format."""

from typing import Any

from llmchat.chat import ChatError, ChatRequest, ToolSpec
from llmchat.grammar import schema_problem


class ToolSet:
    """Collects a request's tools, refusing duplicate names and schemas constrained decoding cannot use."""

    def __init__(self) -> None:
        self.tools: list[ToolSpec] = []

    def add(self, name: str, description: str | None, schema: dict | None, at: str, schema_field: str) -> None:
        """`at` is the tool's path in the request (tools.3 or tools.3.function), `schema_field` its schema's key."""
        if name in {t.name for t in self.tools}:
            raise ChatError(f"Two tools are named '{name}'; tool names must be unique.", f"{at}.name")
        if schema is not None and (problem := schema_problem(schema, must_be_object=True)):
            raise ChatError(f"Tool '{name}': its {schema_field} cannot be enforced: {problem}", f"{at}.{schema_field}")
        self.tools.append(ToolSpec(name, description, schema))

    def done(self) -> tuple[ToolSpec, ...]:
        return tuple(self.tools)


def tool_choice(
    choice: str | None, name: str | None, tools: tuple[ToolSpec, ...], param: str = "tool_choice"
) -> tuple[str, str | None]:
    """(tool_choice, tool_name) for the ChatRequest from none | auto | required | function (with `name`)."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice == "none":
        return "none", None
    if not tools:
        raise ChatError(f"tool_choice is {choice!r}, but the request offers no tools.", param)
    if choice == "function":
        if name not in {t.name for t in tools}:
            raise ChatError(f"tool_choice names {name!r}, which is not one of the offered tools.", param)
        return "function", name
    return choice, None


def json_output(request: ChatRequest, schema: dict[str, Any] | None, field: str, schema_param: str) -> None:
    """Constrains the reply to JSON (matching `schema` when given); `field` names the request's format field."""
    if request.uses_tools:
        raise ChatError(f"{field} cannot be combined with tools; send tool_choice 'none' or drop {field}.", field)
    if schema is not None and (problem := schema_problem(schema, must_be_object=False)):
        raise ChatError(f"The {field} schema is unusable: {problem}", schema_param)
    request.json_output, request.json_schema = True, schema
