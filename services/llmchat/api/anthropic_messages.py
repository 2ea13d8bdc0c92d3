"""Anthropic Messages adapter: /v1/messages and /v1/messages/count_tokens.

Wire request -> ChatRequest; chat events -> the Messages stream events, while the same state builds the
whole message, so streamed and whole responses cannot disagree. Errors on these routes are Anthropic's.
"""

import json
import uuid
from typing import Annotated, Literal

import jiter
from anthropic.types import (
    ErrorResponse,
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    MessageTokensCount,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlock,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types import TextDelta as WireTextDelta
from anthropic.types.raw_message_delta_event import Delta
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from hrserve import Dialect, DialectRouter, ServiceError, client_job_id
from llmchat.api import anthropic_types as wire
from llmchat.api.common import ToolSet, dump, json_output, tool_choice
from llmchat.api.openapi import JsonText, ok_responses
from llmchat.api.serving import Reply, Serving, WireEvent, invalid
from llmchat.chat import (
    CallRecord,
    ChatError,
    ChatEvent,
    ChatMessage,
    ChatRequest,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallCut,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
)

PATH = "/v1/messages"
# The chat core's field names, as this protocol names them.
NAMES = {"output_format": "output_config.format"}
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Anthropic documents 413 as `request_too_large`; the SDK's union of error objects leaves it out.
_TOO_LARGE = {
    "type": "object",
    "required": ["type", "message"],
    "properties": {"type": {"const": "request_too_large"}, "message": {"type": "string"}},
}
ERROR_ENVELOPE = "AnthropicErrorEnvelope"


def _error_envelope_schema() -> dict:
    """The SDK's ErrorResponse, its error objects kept in its own $defs (the envelope is one component of
    /openapi.json), plus the 413 error."""
    schema = ErrorResponse.model_json_schema(
        ref_template=f"#/components/schemas/{ERROR_ENVELOPE}/$defs/{{model}}", mode="serialization"
    )
    schema["properties"]["error"]["anyOf"].append(_TOO_LARGE)
    return schema


# Anthropic's error body, on every route of this adapter's router (and the x-api-key header its SDK sends).
DIALECT = Dialect(
    ERROR_ENVELOPE,
    _error_envelope_schema(),
    lambda e: {
        "type": "error",
        "error": {
            "type": _ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error"),
            "message": e.message,
        },
    },
    key_header="x-api-key",
)
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none", "tool": "function"}


def chat_input(body: wire.MessagesInput) -> ChatRequest:
    """The prompt side of a request (all that count_tokens needs); raises ChatError (a 400)."""
    tools = _tools(body.tools or ())
    choice, tool_name, parallel = _tool_choice(body.tool_choice, tools)
    request = ChatRequest(
        messages=_messages(body),
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel,
    )
    if body.thinking is not None and body.thinking.type in ("enabled", "disabled"):
        # The budget cannot be enforced; templates that reason (Qwen3 and kin) switch on this flag.
        request.template_kwargs["enable_thinking"] = body.thinking.type == "enabled"
    if body.output_config is not None and body.output_config.format is not None:
        json_output(request, body.output_config.format.schema_, "output_config.format", "output_config.format.schema")
    return request


def to_chat_request(body: wire.MessagesRequest) -> ChatRequest:
    request = chat_input(body)
    request.max_tokens = body.max_tokens
    request.temperature = body.temperature
    request.top_p = 1.0 if body.top_p is None else body.top_p
    request.top_k = body.top_k or 0
    request.stop = tuple(body.stop_sequences or ())
    return request


def _messages(body: wire.MessagesInput) -> list[ChatMessage]:
    if body.messages[-1].role == "assistant":
        # Anthropic would continue that turn; the chat template here always opens a new one.
        raise ChatError(
            "The last message is the assistant's: continuing a prefilled assistant turn is not supported. "
            "End the conversation with a user message.",
            f"messages.{len(body.messages) - 1}.role",
        )
    out = []
    if body.system:
        system = body.system if isinstance(body.system, str) else _join(b.text for b in body.system)
        out.append(ChatMessage("system", system))
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            out.append(ChatMessage(message.role, message.content))
        else:
            out.extend(_turn(message.role, message.content, f"messages.{i}"))
    return out


def _turn(role: str, blocks: list, where: str) -> list[ChatMessage]:
    """One wire message -> chat messages: each tool_result becomes a `tool` message in its place."""
    out: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[CallRecord] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        if isinstance(block, wire.TextBlock):
            texts.append(block.text)
        elif isinstance(block, wire.ToolUseBlock):
            _expect_role(role, "assistant", block.type, at)
            calls.append(CallRecord(block.id, block.name, json.dumps(block.input)))
        elif isinstance(block, wire.ToolResultBlock):
            _expect_role(role, "user", block.type, at)
            if texts:
                out.append(ChatMessage("user", _join(texts)))
                texts = []
            text = _result_text(block, at)
            out.append(
                ChatMessage("tool", f"Error: {text}" if block.is_error else text, tool_call_id=block.tool_use_id)
            )
        elif isinstance(block, wire.OtherBlock):
            raise _unsupported(block, at)
        # Earlier thinking is dropped, as Anthropic drops it from later turns.
    if texts or calls or not out:
        out.append(ChatMessage(role, _join(texts), tuple(calls)))
    return out


def _result_text(block: wire.ToolResultBlock, at: str) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    for k, part in enumerate(block.content):
        if isinstance(part, wire.OtherBlock):
            raise _unsupported(part, f"{at}.content.{k}")
    return _join(part.text for part in block.content)


def _join(texts) -> str:
    # Separate blocks read as separate paragraphs.
    return "\n\n".join(texts)


def _expect_role(role: str, expected: str, kind: str, at: str) -> None:
    if role != expected:
        raise ChatError(f"{kind} blocks belong in {expected} messages, not {role} ones.", at)


def _unsupported(block: wire.OtherBlock, at: str) -> ChatError:
    return ChatError(
        f"This server's model reads text only: {block.type} blocks are not supported. Send the content as text.",
        at,
    )


def _tools(tools: list[wire.Tool]) -> tuple[ToolSpec, ...]:
    out = ToolSet()
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise ChatError(
                f"Tool '{tool.name}' is a server tool ({tool.type}); this server runs no tools itself. "
                "Define it as a client tool with an input_schema and run it yourself.",
                f"tools.{i}.type",
            )
        if tool.input_schema is None:
            raise ChatError(
                f"Tool '{tool.name}' has no input_schema; send a JSON Schema of type 'object'.",
                f"tools.{i}.input_schema",
            )
        out.add(tool.name, tool.description, tool.input_schema, f"tools.{i}", "input_schema")
    return out.done()


def _tool_choice(choice: wire.ToolChoice | None, tools: tuple[ToolSpec, ...]) -> tuple[str, str | None, bool]:
    """(tool_choice, tool_name, parallel_tool_calls) for the ChatRequest."""
    if choice is None:
        return *tool_choice(None, None, tools), True
    param = "tool_choice.name" if choice.type == "tool" else "tool_choice"
    return *tool_choice(_TOOL_CHOICES[choice.type], choice.name, tools, param), not choice.disable_parallel_tool_use


def _tool_use_id(call_id: str) -> str:
    # The chat core names calls OpenAI's way (call_<hex>); the same hex keeps each id unique.
    return "toolu_" + call_id.removeprefix("call_")


def _stop_reason(finish: Finish) -> str:
    if finish.reason == "length":
        return "max_tokens"
    if finish.reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if finish.stop_sequence is not None else "end_turn"


def _tool_input(arguments: str) -> dict:
    # Only max_tokens can cut a call short; its input is then what parses, as the SDK's stream
    # accumulator would show it.
    try:
        value = jiter.from_json(arguments.encode(), partial_mode=True)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}


def _is_whole_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except json.JSONDecodeError:
        return False


class Ping(BaseModel):
    type: Literal["ping"]


class MessageReply(Reply):
    """Chat events -> Messages stream events, while building the same message as one response.

    Block indices are positions in `content`. Like Anthropic, a block is stopped before the next one
    starts, except a tool_use block whose input is not yet a whole JSON object: chat events may still
    add to an earlier call after a later one started, so such a block stays open (deltas name their
    block by index, and the SDK accumulates by index) until its input is whole or the message ends.
    """

    named_events = True

    def __init__(self, model: str) -> None:
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.message = Message(
            id=self.id,
            type="message",
            role="assistant",
            model=model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=Usage(input_tokens=0, output_tokens=0, cache_creation_input_tokens=0, cache_read_input_tokens=0),
        )
        self.open: list[int] = []  # indices of started, not yet stopped blocks
        self.blocks: dict[int, int] = {}  # tool call index -> block index
        self.arguments: dict[int, str] = {}  # block index -> the tool input's JSON so far
        self.cut: set[int] = set()  # tool_use blocks the output ended inside: streamed, left out of the message

    def start(self, num_prompt_tokens: int) -> list[WireEvent]:
        self.message.usage.input_tokens = num_prompt_tokens
        start = RawMessageStartEvent(type="message_start", message=self.message.model_copy(deep=True))
        # Anthropic pings once after message_start; clients expect and skip it.
        return [start, Ping(type="ping")]

    def feed(self, event: ChatEvent, choice: int = 0) -> list[WireEvent]:
        if isinstance(event, TextDelta | ReasoningDelta) and event.text:
            return self._text(event)
        if isinstance(event, ToolCallStart):
            out: list[WireEvent] = self._stop_whole()
            block = ToolUseBlock(type="tool_use", id=_tool_use_id(event.id), name=event.name, input={})
            self.blocks[event.index] = len(self.message.content)
            self.arguments[len(self.message.content)] = ""
            return out + [self._start(block)]
        if isinstance(event, ToolCallDelta):
            index = self.blocks[event.index]
            self.arguments[index] += event.arguments
            # A stopped block's input was already a whole object: nothing valid can follow it.
            if index not in self.open:
                return []
            delta = InputJSONDelta(type="input_json_delta", partial_json=event.arguments)
            return [RawContentBlockDeltaEvent(type="content_block_delta", index=index, delta=delta)]
        if isinstance(event, ToolCallCut):
            self.cut.add(self.blocks[event.index])
            return []
        if isinstance(event, Finish):
            out = [self._stop(index) for index in list(self.open)]
            return out + [self._finish(event), RawMessageStopEvent(type="message_stop")]
        return []

    def response(self) -> Message:
        # A tool_use cut by max_tokens has only part of its input; a client would run it with what parsed.
        # The message leaves it out, and stop_reason max_tokens tells why.
        if not self.cut:
            return self.message
        content = [block for index, block in enumerate(self.message.content) if index not in self.cut]
        return self.message.model_copy(update={"content": content})

    def stream_error(self, error: ServiceError) -> list[dict]:
        # The status line is gone: Anthropic reports in-band as an `error` event, then the stream ends.
        return [{"event": "error", "data": json.dumps(error.body(DIALECT))}]

    def _text(self, event: TextDelta | ReasoningDelta) -> list[RawMessageStreamEvent]:
        out: list[RawMessageStreamEvent] = []
        content, index = self.message.content, len(self.message.content) - 1
        kind = "thinking" if isinstance(event, ReasoningDelta) else "text"
        if not (index in self.open and content[index].type == kind):
            out += self._stop_whole()
            empty = (
                TextBlock(type="text", text="")
                if kind == "text"
                else ThinkingBlock(type="thinking", thinking="", signature="")
            )
            out.append(self._start(empty))
            index = len(content) - 1
        if kind == "text":
            content[index].text += event.text
            delta = WireTextDelta(type="text_delta", text=event.text)
        else:
            content[index].thinking += event.text
            delta = ThinkingDelta(type="thinking_delta", thinking=event.text)
        out.append(RawContentBlockDeltaEvent(type="content_block_delta", index=index, delta=delta))
        return out

    def _start(self, block) -> RawContentBlockStartEvent:
        index = len(self.message.content)
        self.message.content.append(block)
        self.open.append(index)
        return RawContentBlockStartEvent(type="content_block_start", index=index, content_block=block.model_copy())

    def _stop_whole(self) -> list[RawContentBlockStopEvent]:
        """Stops the open blocks nothing more can be added to, before a new block starts."""
        whole = [i for i in self.open if i not in self.arguments or _is_whole_object(self.arguments[i])]
        return [self._stop(i) for i in whole]

    def _stop(self, index: int) -> RawContentBlockStopEvent:
        self.open.remove(index)
        if index in self.arguments:
            self.message.content[index].input = _tool_input(self.arguments[index])
        return RawContentBlockStopEvent(type="content_block_stop", index=index)

    def _finish(self, finish: Finish) -> RawMessageDeltaEvent:
        message = self.message
        message.stop_reason = _stop_reason(finish)
        message.stop_sequence = finish.stop_sequence
        # Anthropic's input_tokens leaves out the tokens read from cache; only now is their number known.
        usage = message.usage
        usage.input_tokens = finish.prompt_tokens - finish.cached_tokens
        usage.cache_read_input_tokens = finish.cached_tokens
        usage.output_tokens = finish.completion_tokens
        return RawMessageDeltaEvent(
            type="message_delta",
            delta=Delta(stop_reason=message.stop_reason, stop_sequence=message.stop_sequence),
            usage=MessageDeltaUsage(
                input_tokens=usage.input_tokens,
                cache_creation_input_tokens=0,
                cache_read_input_tokens=usage.cache_read_input_tokens,
                output_tokens=usage.output_tokens,
            ),
        )


# Never built: it describes the stream's events in /openapi.json (its docstring is the schema's description).
class MessageSSE(BaseModel):
    """One server-sent event of a streamed message, named by its `type`; an error after the status line went
    out is an `error` event with the error envelope."""

    event: str
    # The SDK's union of stream events leaves out the ping, which its stream reader skips.
    data: Annotated[RawMessageStreamEvent | Ping, JsonText((DIALECT.name,))]


def router(serving: Serving) -> APIRouter:
    api = DialectRouter(DIALECT)
    ok = ok_responses("A message object, or with `stream: true` the Messages server-sent events.", Message, MessageSSE)

    @api.post(PATH, response_model=None, responses=ok)
    async def messages(
        body: wire.MessagesRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> Response:
        return await serving.respond(
            request,
            model=body.model,
            build=lambda: to_chat_request(body),
            reply=MessageReply(serving.runtime.model_name),
            stream=body.stream,
            job_id=job_id,
            names=NAMES,
        )

    @api.post(
        f"{PATH}/count_tokens",
        response_model=None,
        responses={200: {"description": "The prompt's token count.", "model": MessageTokensCount}},
    )
    async def count_tokens(body: wire.MessagesInput) -> dict:
        serving.check_model(body.model)
        chat = serving.runtime.require_chat()
        try:
            num = await chat.count_prompt_tokens(chat_input(body))
        except ChatError as exc:
            raise invalid(exc, NAMES) from None
        return dump(MessageTokensCount(input_tokens=num))

    return api
