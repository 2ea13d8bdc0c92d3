"""OpenAI Chat Completions adapter: wire request -> ChatRequest, ChatEvents -> chunks or one response."""

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
)
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_message_tool_call import Function
from openai.types.completion_usage import CompletionUsage

from llmchat.chat import (
    CallRecord,
    ChatError,
    ChatEvent,
    ChatMessage,
    ChatRequest,
    Finish,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
)
from llmchat.grammar import schema_problem
from llmchat.openai_types import ChatCompletionRequest, Message, NamedToolChoice

# OpenAI's "developer" role is the newer name for "system"; chat templates only know the latter.
_ROLES = {"developer": "system"}


def to_chat_request(body: ChatCompletionRequest) -> ChatRequest:
    """The protocol-neutral request; raises ChatError (a 400) for anything that cannot be honoured."""
    if body.logprobs:
        raise ChatError("logprobs are not supported by this server.", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise ChatError(f"{name} is not supported by this server; leave it at 0.", name)
    tools = _tools(body)
    choice, tool_name = _tool_choice(body, tools)
    request = ChatRequest(
        messages=[_message(m, i) for i, m in enumerate(body.messages)],
        max_tokens=body.completion_limit(),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=body.parallel_tool_calls,
    )
    _response_format(body, request)
    return request


def _message(m: Message, i: int) -> ChatMessage:
    calls = []
    for j, call in enumerate(m.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ChatError(
                "A tool call's arguments must be a JSON object encoded as a string, as the server returned it.",
                f"messages.{i}.tool_calls.{j}.function.arguments",
            )
        calls.append(CallRecord(call.id, call.function.name, call.function.arguments))
    return ChatMessage(_ROLES.get(m.role, m.role), m.text(), tuple(calls), m.tool_call_id)


def _tools(body: ChatCompletionRequest) -> tuple[ToolSpec, ...]:
    seen: set[str] = set()
    tools = []
    for i, tool in enumerate(body.tools or ()):
        function = tool.function
        if function.name in seen:
            raise ChatError(
                f"Two tools are named '{function.name}'; tool names must be unique.", f"tools.{i}.function.name"
            )
        seen.add(function.name)
        if function.parameters is not None and (problem := schema_problem(function.parameters, must_be_object=True)):
            raise ChatError(
                f"The parameters of tool '{function.name}' are unusable: {problem}", f"tools.{i}.function.parameters"
            )
        tools.append(ToolSpec(function.name, function.description, function.parameters))
    return tuple(tools)


def _tool_choice(body: ChatCompletionRequest, tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    choice = body.tool_choice
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice == "none":
        return "none", None
    if not tools:
        raise ChatError(f"tool_choice is {choice!r}, but the request offers no tools.", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t.name for t in tools}:
            raise ChatError(
                f"tool_choice names '{choice.function.name}', which is not one of the offered tools.",
                "tool_choice",
            )
        return "function", choice.function.name
    return choice, None


def _response_format(body: ChatCompletionRequest, request: ChatRequest) -> None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return
    if request.uses_tools:
        raise ChatError(
            "response_format cannot be combined with tools; send tool_choice 'none' or drop response_format.",
            "response_format",
        )
    request.json_output = True
    if fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        if schema is not None and (problem := schema_problem(schema, must_be_object=False)):
            raise ChatError(f"The response_format schema is unusable: {problem}", "response_format.json_schema.schema")
        request.json_schema = schema


@dataclass(slots=True)
class ResponseInfo:
    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _usage(finish: Finish) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )


async def to_response(events: AsyncIterator[ChatEvent], info: ResponseInfo) -> tuple[ChatCompletion, Finish]:
    parts: list[str] = []
    calls: list[ChatCompletionMessageToolCall] = []
    finish = None
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, ToolCallStart):
            function = Function(name=event.name, arguments="")
            calls.append(ChatCompletionMessageToolCall(id=event.id, type="function", function=function))
        elif isinstance(event, ToolCallDelta):
            calls[event.index].function.arguments += event.arguments
        elif isinstance(event, Finish):
            finish = event
    assert finish is not None, "chat events always end with Finish"
    # OpenAI sends content null, not "", when the reply is only tool calls.
    content = "".join(parts) if parts or not calls else None
    message = ChatCompletionMessage(role="assistant", content=content, refusal=None)
    if calls:
        message.tool_calls = calls
    response = ChatCompletion(
        id=info.id,
        object="chat.completion",
        created=info.created,
        model=info.model,
        choices=[Choice(index=0, message=message, finish_reason=finish.reason, logprobs=None)],
        usage=_usage(finish),
    )
    return response, finish


def _chunk(info: ResponseInfo, delta: ChoiceDelta | None, finish_reason=None, usage=None, include_usage=False) -> str:
    chunk = ChatCompletionChunk(
        id=info.id,
        object="chat.completion.chunk",
        created=info.created,
        model=info.model,
        choices=[]
        if delta is None
        else [ChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=None)],
    )
    if include_usage:
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        chunk.usage = usage
    return chunk.model_dump_json(exclude_unset=True)


async def stream_chunks(
    events: AsyncIterator[ChatEvent], info: ResponseInfo, include_usage: bool
) -> AsyncIterator[str | Finish]:
    """Yields the JSON of each chunk, in order: role, content deltas, finish_reason, usage.

    The Finish event is passed through too (after the finish chunk) so the caller can record it.
    """
    yield _chunk(info, ChoiceDelta(role="assistant"), include_usage=include_usage)
    async for event in events:
        if isinstance(event, TextDelta):
            yield _chunk(info, ChoiceDelta(content=event.text), include_usage=include_usage)
            continue
        if isinstance(event, ToolCallStart | ToolCallDelta):
            yield _chunk(info, ChoiceDelta(tool_calls=[_call_delta(event)]), include_usage=include_usage)
            continue
        if not isinstance(event, Finish):
            continue
        yield _chunk(info, ChoiceDelta(), finish_reason=event.reason, include_usage=include_usage)
        if include_usage:
            yield _chunk(info, None, usage=_usage(event), include_usage=True)
        yield event


def _call_delta(event: ToolCallStart | ToolCallDelta) -> ChoiceDeltaToolCall:
    """The first delta of a call carries its id, type and name; later ones only argument fragments."""
    if isinstance(event, ToolCallStart):
        function = ChoiceDeltaToolCallFunction(name=event.name, arguments="")
        return ChoiceDeltaToolCall(index=event.index, id=event.id, type="function", function=function)
    return ChoiceDeltaToolCall(index=event.index, function=ChoiceDeltaToolCallFunction(arguments=event.arguments))
