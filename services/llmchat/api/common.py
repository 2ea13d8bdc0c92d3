"""What the protocol adapters share: the checks every request mapper makes (each naming the fields in its own
wire format), the OpenAI pieces chat and completions both use, and the shapes of responses and events."""

from typing import Any

from openai.types.completion_usage import CompletionUsage, PromptTokensDetails
from pydantic import BaseModel

from llmchat.api.openai_types import ResponseFormat, StreamOptions
from llmchat.chat import ChatError, ChatRequest, Finish, ToolSpec
from llmchat.chat.grammar import schema_problem

# OpenAI's "developer" role is the newer name for "system"; chat templates only know the latter.
ROLES = {"developer": "system"}
# Marks the end of an OpenAI stream (chat and completions).
DONE = "[DONE]"


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


def include_usage(options: StreamOptions | None) -> bool:
    return bool(options and options.include_usage)


def completion_usage(*finishes: Finish) -> CompletionUsage:
    """Chat and legacy completions usage of one or more choices: the prompt once, the completions summed, as
    OpenAI counts n choices; cached_tokens (part of prompt_tokens) is always there, 0 on a miss."""
    first = finishes[0]
    completion_tokens = sum(f.completion_tokens for f in finishes)
    return CompletionUsage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=first.prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens),
    )


def response_format(fmt: ResponseFormat | None, request: ChatRequest) -> None:
    """OpenAI's response_format (chat, and completions as vLLM allows): JSON output, matching a schema if given."""
    if fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        json_output(request, schema, "response_format", "response_format.json_schema.schema")


def chunk_usage(chunk: BaseModel, include: bool, usage: CompletionUsage | None = None) -> BaseModel:
    """With include_usage, OpenAI sends "usage": null on every chunk but the last; without it, no usage at all."""
    if include:
        chunk.usage = usage
    return chunk


def dump(model: BaseModel) -> dict:
    """A response object as its JSON: only the fields that were set, as the official APIs send them."""
    return model.model_dump(mode="json", exclude_unset=True)


def sse(item: BaseModel | str, named: bool) -> dict:
    """One server-sent event for sse-starlette: a wire event's JSON as data (named after its `type` where the
    protocol names its events), or a bare marker such as [DONE]."""
    if isinstance(item, str):
        return {"data": item}
    data = item.model_dump_json(exclude_unset=True)
    return {"event": item.type, "data": data} if named else {"data": data}
