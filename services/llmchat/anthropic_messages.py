"""Anthropic Messages adapter: /v1/messages and /v1/messages/count_tokens.

Wire request -> ChatRequest; chat events -> the Messages stream events, which a single response is
folded from, so streamed and whole responses cannot disagree.
"""

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jiter
from anthropic.types import (
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
from fastapi.responses import JSONResponse, Response

from hrserve import ServiceError, client_job_id
from llmchat import anthropic_types as wire
from llmchat.adapt import ToolSet, json_output, tool_choice
from llmchat.chat import (
    CallRecord,
    ChatError,
    ChatEvent,
    ChatMessage,
    ChatRequest,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
)
from llmchat.serving import Serving, invalid

PATH = "/v1/messages"
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
MESSAGES_200 = {
    "description": "A message object, or with `stream: true` the Messages server-sent events.",
    "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}},
}
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


@dataclass(slots=True)
class MessageInfo:
    model: str
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")


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


class MessageStream:
    """Chat events -> Messages stream events, while building the same message as one response.

    Block indices are positions in `content`. Like Anthropic, a block is stopped before the next one
    starts, except a tool_use block whose input is not yet a whole JSON object: chat events may still
    add to an earlier call after a later one started, so such a block stays open (deltas name their
    block by index, and the SDK accumulates by index) until its input is whole or the message ends.
    """

    def __init__(self, info: MessageInfo, input_tokens: int) -> None:
        usage = Usage(
            input_tokens=input_tokens, output_tokens=0, cache_creation_input_tokens=0, cache_read_input_tokens=0
        )
        self.message = Message(
            id=info.id,
            type="message",
            role="assistant",
            model=info.model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=usage,
        )
        self.open: list[int] = []  # indices of started, not yet stopped blocks
        self.blocks: dict[int, int] = {}  # tool call index -> block index
        self.arguments: dict[int, str] = {}  # block index -> the tool input's JSON so far

    async def events(self, events: AsyncIterator[ChatEvent]) -> AsyncIterator[RawMessageStreamEvent]:
        yield RawMessageStartEvent(type="message_start", message=self.message.model_copy(deep=True))
        async for event in events:
            if isinstance(event, TextDelta | ReasoningDelta) and event.text:
                for item in self._text(event):
                    yield item
            elif isinstance(event, ToolCallStart):
                for item in self._stop_whole():
                    yield item
                block = ToolUseBlock(type="tool_use", id=_tool_use_id(event.id), name=event.name, input={})
                self.blocks[event.index] = len(self.message.content)
                self.arguments[len(self.message.content)] = ""
                yield self._start(block)
            elif isinstance(event, ToolCallDelta):
                index = self.blocks[event.index]
                self.arguments[index] += event.arguments
                # A stopped block's input was already a whole object: nothing valid can follow it.
                if index in self.open:
                    delta = InputJSONDelta(type="input_json_delta", partial_json=event.arguments)
                    yield RawContentBlockDeltaEvent(type="content_block_delta", index=index, delta=delta)
            elif isinstance(event, Finish):
                for index in list(self.open):
                    yield self._stop(index)
                yield self._finish(event)
                yield RawMessageStopEvent(type="message_stop")

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


async def to_message(events: AsyncIterator[ChatEvent], info: MessageInfo, input_tokens: int) -> Message:
    stream = MessageStream(info, input_tokens)
    async for _ in stream.events(events):
        pass
    return stream.message


def _dump(model) -> dict:
    return model.model_dump(mode="json", exclude_unset=True)


async def sse_events(events: AsyncIterator[ChatEvent], info: MessageInfo, input_tokens: int):
    async for event in MessageStream(info, input_tokens).events(events):
        yield {"event": event.type, "data": json.dumps(_dump(event))}
        if event.type == "message_start":
            # Anthropic pings once after message_start; clients expect and skip it.
            yield {"event": "ping", "data": json.dumps({"type": "ping"})}


def _sse_error(error: ServiceError) -> list[dict]:
    # The status line is gone: Anthropic reports in-band as an `error` event, then the stream ends.
    return [{"event": "error", "data": json.dumps(error.body(PATH))}]


def router(serving: Serving) -> APIRouter:
    api = APIRouter()

    @api.post(PATH, response_model=None, responses={200: MESSAGES_200})
    async def messages(
        body: wire.MessagesRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> JSONResponse | Response:
        info = MessageInfo(model=serving.runtime.model_name)
        run = await serving.start(
            request, body.model, lambda: to_chat_request(body), response_id=info.id, stream=body.stream, job_id=job_id
        )
        if body.stream:
            return run.stream(lambda events: sse_events(events, info, run.num_prompt_tokens), _sse_error)
        return await run.reply(request, lambda events: to_message(events, info, run.num_prompt_tokens), _dump)

    @api.post(f"{PATH}/count_tokens")
    async def count_tokens(body: wire.MessagesInput) -> dict:
        serving.check_model(body.model)
        chat = serving.runtime.require_chat()
        try:
            num = await chat.count_prompt_tokens(chat_input(body))
        except ChatError as exc:
            raise invalid(exc) from None
        return _dump(MessageTokensCount(input_tokens=num))

    return api
