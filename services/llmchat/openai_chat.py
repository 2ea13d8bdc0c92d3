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
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message_tool_call import Function
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_usage import CompletionUsage, PromptTokensDetails

from llmchat.adapt import ToolSet, json_output, tool_choice
from llmchat.chat import (
    CallRecord,
    ChatError,
    ChatEvent,
    ChatMessage,
    ChatRequest,
    Finish,
    Logprobs,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
)
from llmchat.openai_types import ChatCompletionRequest, Message, NamedToolChoice

# OpenAI's "developer" role is the newer name for "system"; chat templates only know the latter.
_ROLES = {"developer": "system"}


def to_chat_request(body: ChatCompletionRequest) -> ChatRequest:
    """The protocol-neutral request; raises ChatError (a 400) for anything that cannot be honoured."""
    if body.n != 1:
        raise ChatError(f"n is {body.n}, but this server returns one choice per request; send n=1.", "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise ChatError("top_logprobs needs logprobs: true.", "top_logprobs")
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
        reasoning_effort=body.reasoning_effort,
        template_kwargs=dict(body.chat_template_kwargs or {}),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    _response_format(body, request)
    return request


def _message(m: Message, i: int) -> ChatMessage:
    for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
        if part.type != "text":
            raise ChatError(
                f"This server serves a text-only model; {part.type} parts are not supported. Send text parts only.",
                f"messages.{i}.content.{j}",
            )
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
    tools = ToolSet()
    for i, tool in enumerate(body.tools or ()):
        f = tool.function
        tools.add(f.name, f.description, f.parameters, f"tools.{i}.function", "parameters")
    return tools.done()


def _tool_choice(body: ChatCompletionRequest, tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tool_choice("function", choice.function.name, tools)
    return tool_choice(choice, None, tools)


def _response_format(body: ChatCompletionRequest, request: ChatRequest) -> None:
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        json_output(request, schema, "response_format", "response_format.json_schema.schema")


@dataclass(slots=True)
class ResponseInfo:
    model: str
    logprobs: bool = False  # the request asked for them
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def completion_usage(finish: Finish) -> CompletionUsage:
    """Chat and legacy completions usage; cached_tokens (part of prompt_tokens) is always there, 0 on a miss."""
    return CompletionUsage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finish.cached_tokens),
    )


async def to_response(events: AsyncIterator[ChatEvent], info: ResponseInfo) -> tuple[ChatCompletion, Finish]:
    parts: list[str] = []
    reasoning: list[str] = []
    calls: list[ChatCompletionMessageToolCall] = []
    logprobs: list[ChatCompletionTokenLogprob] = []
    finish = None
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Logprobs):
            logprobs += _token_logprobs(event)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            function = Function(name=event.name, arguments="")
            calls.append(ChatCompletionMessageToolCall(id=event.id, type="function", function=function))
        elif isinstance(event, ToolCallDelta):
            calls[event.index].function.arguments += event.arguments
        elif isinstance(event, Finish):
            finish = event
    assert finish is not None, "chat events always end with Finish"
    # OpenAI sends content null, not "", when the reply is only tool calls (vLLM too when it is only reasoning).
    content = "".join(parts) if parts or not (calls or reasoning) else None
    # Not in OpenAI's schema (the SDK keeps extra fields): DeepSeek's API and older vLLM name it
    # reasoning_content, newer vLLM and OpenRouter reasoning; clients read one or the other.
    extra = dict.fromkeys(("reasoning_content", "reasoning"), "".join(reasoning)) if reasoning else {}
    message = ChatCompletionMessage(role="assistant", content=content, refusal=None, **extra)
    if calls:
        message.tool_calls = calls
    response = ChatCompletion(
        id=info.id,
        object="chat.completion",
        created=info.created,
        model=info.model,
        choices=[
            Choice(
                index=0,
                message=message,
                finish_reason=finish.reason,
                logprobs=ChoiceLogprobs(content=logprobs, refusal=None) if info.logprobs else None,
            )
        ],
        usage=completion_usage(finish),
    )
    return response, finish


def _token_logprobs(event: Logprobs) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.token.encode()),
            top_logprobs=[TopLogprob(token=token, logprob=lp, bytes=list(token.encode())) for token, lp in t.top],
        )
        for t in event.tokens
    ]


def _chunk(
    info: ResponseInfo,
    delta: ChoiceDelta | None,
    finish_reason=None,
    usage=None,
    include_usage=False,
    logprobs: list[ChatCompletionTokenLogprob] | None = None,
) -> str:
    choice_logprobs = ChunkLogprobs(content=logprobs, refusal=None) if logprobs else None
    chunk = ChatCompletionChunk(
        id=info.id,
        object="chat.completion.chunk",
        created=info.created,
        model=info.model,
        choices=[]
        if delta is None
        else [ChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=choice_logprobs)],
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
    # Log-probabilities ride on the next chunk that carries output (text may be held back a while).
    pending: list[ChatCompletionTokenLogprob] = []
    async for event in events:
        delta = None
        if isinstance(event, Logprobs):
            pending += _token_logprobs(event)
        elif isinstance(event, TextDelta):
            delta = ChoiceDelta(content=event.text)
        elif isinstance(event, ReasoningDelta):
            delta = ChoiceDelta(reasoning_content=event.text, reasoning=event.text)
        elif isinstance(event, ToolCallStart | ToolCallDelta):
            delta = ChoiceDelta(tool_calls=[_call_delta(event)])
        if delta is not None:
            yield _chunk(info, delta, include_usage=include_usage, logprobs=pending)
            pending = []
        if not isinstance(event, Finish):
            continue
        yield _chunk(info, ChoiceDelta(), event.reason, include_usage=include_usage, logprobs=pending)
        if include_usage:
            yield _chunk(info, None, usage=completion_usage(event), include_usage=True)
        yield event


def _call_delta(event: ToolCallStart | ToolCallDelta) -> ChoiceDeltaToolCall:
    """The first delta of a call carries its id, type and name; later ones only argument fragments."""
    if isinstance(event, ToolCallStart):
        function = ChoiceDeltaToolCallFunction(name=event.name, arguments="")
        return ChoiceDeltaToolCall(index=event.index, id=event.id, type="function", function=function)
    return ChoiceDeltaToolCall(index=event.index, function=ChoiceDeltaToolCallFunction(arguments=event.arguments))
