"""OpenAI Responses API, stateless: POST /v1/responses -> ChatRequest, ChatEvents -> one Response or its
stream of typed events. The stored-response routes answer that nothing is stored."""

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, get_args

from fastapi import APIRouter, Depends, Request
from fastapi import Response as HTTPResponse
from fastapi.responses import JSONResponse
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_reasoning_item import Content as ReasoningContent
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import BaseModel

from hrserve import ServiceError, client_job_id
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
from llmchat.responses_types import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    NamedFunctionChoice,
    OtherPart,
    OtherTool,
    ReasoningItem,
    ResponsesRequest,
)
from llmchat.serving import Serving, SSEvents

# OpenAI's "developer" role is the newer name for "system"; chat templates only know the latter.
_ROLES = {"developer": "system"}
_MEDIA = {"input_image": "images", "input_file": "files", "input_audio": "audio"}
# The chat core names chat-completions fields; these are their names in a Responses request.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
_TOOL_FIELDS = {"type", "name", "description", "parameters", "strict"}
_FORMAT_FIELDS = {"type", "name", "description", "schema_", "strict"}
STATELESS = "This server is stateless and stores no responses"
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
RESPONSES_200 = {
    "description": "A response object, or with `stream: true` server-sent events named by their `type`.",
    "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}},
}


def to_chat_request(body: ResponsesRequest) -> ChatRequest:
    """The protocol-neutral request; raises ChatError (a 400) for anything that cannot be honoured."""
    for name in ("previous_response_id", "conversation"):
        if getattr(body, name) is not None:
            raise ChatError(
                f"{name} cannot be used: {STATELESS}. Send the whole conversation as input items instead "
                "(earlier output items, then function_call_output items and new messages).",
                name,
            )
    if body.background:
        raise ChatError(
            f"background responses need stored responses. {STATELESS}; leave background unset.", "background"
        )
    tools = _tools(body)
    choice, tool_name = _tool_choice(body, tools)
    request = ChatRequest(
        messages=_messages(body),
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=body.parallel_tool_calls,
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
    )
    _text_format(body, request)
    return request


def _messages(body: ResponsesRequest) -> list[ChatMessage]:
    messages = [ChatMessage("system", body.instructions)] if body.instructions else []
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    call_ids: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            messages.append(ChatMessage(_ROLES.get(item.role, item.role), _text(item.content, f"input.{i}.content")))
        elif isinstance(item, FunctionCallItem):
            _check_arguments(item.arguments, f"input.{i}.arguments")
            call = CallRecord(item.call_id, item.name, item.arguments)
            call_ids.add(item.call_id)
            # One assistant turn is a message item and/or several function_call items: chat templates
            # want them as one assistant message carrying the calls.
            if messages and messages[-1].role == "assistant":
                messages[-1].tool_calls += (call,)
            else:
                messages.append(ChatMessage("assistant", "", (call,)))
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in call_ids:
                raise ChatError(
                    f"No function_call item before this output has call_id '{item.call_id}'. {STATELESS}: "
                    "send the function_call item itself before its output.",
                    f"input.{i}.call_id",
                )
            messages.append(ChatMessage("tool", _text(item.output, f"input.{i}.output"), tool_call_id=item.call_id))
        elif isinstance(item, ReasoningItem):
            # Earlier turns' reasoning is not shown to the model again (chat templates drop it too).
            continue
        else:
            raise ChatError(
                f"Input items of type '{item.type}' are not supported; send message, function_call and "
                "function_call_output items.",
                f"input.{i}.type",
            )
    return messages


def _text(content: str | list, param: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if isinstance(part, OtherPart):
            what = f"{_MEDIA[part.type]} ({part.type})" if part.type in _MEDIA else f"'{part.type}' parts"
            raise ChatError(
                f"This server's model reads text only: {what} are not supported. Send input_text parts.",
                f"{param}.{j}.type",
            )
    return "".join(part.text for part in content)


def _check_arguments(arguments: str, param: str) -> None:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ChatError("A function call's arguments must be a JSON object encoded as a string.", param)


def _tools(body: ResponsesRequest) -> tuple[ToolSpec, ...]:
    tools = ToolSet()
    for i, tool in enumerate(body.tools or ()):
        if isinstance(tool, OtherTool):
            raise ChatError(
                f"Tools of type '{tool.type}' are not supported: this server hosts no built-in tools. "
                "Offer function tools ({'type': 'function', 'name': ..., 'parameters': ...}).",
                f"tools.{i}.type",
            )
        tools.add(tool.name, tool.description, tool.parameters, f"tools.{i}", "parameters")
    return tools.done()


def _tool_choice(body: ResponsesRequest, tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    choice = body.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        return tool_choice("function", choice.name, tools)
    return tool_choice(choice, None, tools)


def _text_format(body: ResponsesRequest, request: ChatRequest) -> None:
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text":
        schema = fmt.schema_ if fmt.type == "json_schema" else None
        json_output(request, schema, "text.format", "text.format.schema")


def _echo(body: ResponsesRequest) -> dict[str, Any]:
    """The request settings a Response object repeats back."""
    choice = body.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        choice = {"type": "function", "name": choice.name}
    # Only the fields the SDK's types know: an unknown field of the wrong type would fail their validation.
    fmt = body.text.format if body.text else None
    text = fmt.model_dump(include=_FORMAT_FIELDS, by_alias=True, exclude_none=True) if fmt else {"type": "text"}
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": None,
        "reasoning": {"effort": body.reasoning.effort, "summary": body.reasoning.summary} if body.reasoning else None,
        "temperature": body.temperature,
        "text": {"format": text},
        "tool_choice": choice or "auto",
        "tools": [t.model_dump(include=_TOOL_FIELDS, exclude_none=True) for t in body.tools or ()],
        "top_p": body.top_p,
        "user": body.user,
        # Not a field of the SDK's Response type (extra fields are kept): nothing is ever stored here.
        "store": False,
    }


@dataclass(slots=True)
class _Item:
    """One output item being built: a message's text, a reasoning text, or a function call's arguments."""

    type: str  # message | reasoning | function_call
    id: str
    index: int  # its output_index
    text: str = ""
    call_id: str = ""
    name: str = ""
    status: str = "in_progress"

    def model(self) -> BaseModel:
        done = self.status != "in_progress"
        if self.type == "message":
            content = [ResponseOutputText(type="output_text", text=self.text, annotations=[])] if done else []
            return ResponseOutputMessage(
                id=self.id, type="message", role="assistant", status=self.status, content=content
            )
        if self.type == "reasoning":
            content = [ReasoningContent(type="reasoning_text", text=self.text)] if done else []
            return ResponseReasoningItem(id=self.id, type="reasoning", summary=[], content=content)
        return ResponseFunctionToolCall(
            id=self.id,
            type="function_call",
            call_id=self.call_id,
            name=self.name,
            arguments=self.text,
            status=self.status,
        )

    def part(self) -> dict[str, Any]:
        # A dict: each content-part event module declares its own reasoning part class.
        if self.type == "message":
            return {"type": "output_text", "text": self.text, "annotations": []}
        return {"type": "reasoning_text", "text": self.text}


_ID_PREFIXES = {"message": "msg", "reasoning": "rs", "function_call": "fc"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(slots=True)
class ResponseBuilder:
    """Chat events -> the Responses stream events; the final Response comes from the same state, so the
    streamed and the whole response cannot disagree."""

    model: str
    echo: dict[str, Any]
    id: str = field(default_factory=lambda: _new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    items: list[_Item] = field(default_factory=list)
    open: _Item | None = None
    calls: dict[int, _Item] = field(default_factory=dict)
    finish: Finish | None = None
    sequence_number: int = 0

    def _event(self, cls: type[BaseModel], **fields) -> BaseModel:
        # Every event type's `type` is a one-value Literal: the SSE event name.
        (name,) = get_args(cls.model_fields["type"].annotation)
        event = cls(type=name, sequence_number=self.sequence_number, **fields)
        self.sequence_number += 1
        return event

    def response(self) -> Response:
        fields: dict[str, Any] = {"status": "in_progress", "output": [], "usage": None}
        if (finish := self.finish) is not None:
            is_cut = finish.reason == "length"
            fields = {
                "status": "incomplete" if is_cut else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if is_cut else None,
                "completed_at": None if is_cut else time.time(),
                "output": [item.model() for item in self.items],
                "usage": ResponseUsage(
                    input_tokens=finish.prompt_tokens,
                    input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                    output_tokens=finish.completion_tokens,
                    output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
                    total_tokens=finish.prompt_tokens + finish.completion_tokens,
                ),
            }
        return Response(
            id=self.id,
            object="response",
            created_at=self.created_at,
            model=self.model,
            error=None,
            **self.echo | fields,
        )

    def start(self) -> list[BaseModel]:
        return [
            self._event(ResponseCreatedEvent, response=self.response()),
            self._event(ResponseInProgressEvent, response=self.response()),
        ]

    def feed(self, event: ChatEvent) -> list[BaseModel]:
        if isinstance(event, TextDelta | ReasoningDelta) and event.text:
            kind = "message" if isinstance(event, TextDelta) else "reasoning"
            out = [] if self.open and self.open.type == kind else self._open(kind)
            self.open.text += event.text
            cls = ResponseTextDeltaEvent if kind == "message" else ResponseReasoningTextDeltaEvent
            extra = {"logprobs": []} if kind == "message" else {}
            ids = {"item_id": self.open.id, "output_index": self.open.index, "content_index": 0}
            return out + [self._event(cls, delta=event.text, **ids, **extra)]
        if isinstance(event, ToolCallStart):
            out = self._open("function_call", call_id=event.id, name=event.name)
            self.calls[event.index] = self.items[-1]
            return out
        if isinstance(event, ToolCallDelta):
            item = self.calls[event.index]
            item.text += event.arguments
            ids = {"item_id": item.id, "output_index": item.index}
            return [self._event(ResponseFunctionCallArgumentsDeltaEvent, delta=event.arguments, **ids)]
        if isinstance(event, Finish):
            out = self._close("incomplete" if event.reason == "length" else "completed")
            self.finish = event
            cls = ResponseIncompleteEvent if event.reason == "length" else ResponseCompletedEvent
            return out + [self._event(cls, response=self.response())]
        return []  # notices, log-probabilities and anything newer have no Responses event here

    def _open(self, kind: str, **fields) -> list[BaseModel]:
        out = self._close("completed")
        item = _Item(kind, _new_id(_ID_PREFIXES[kind]), len(self.items), **fields)
        self.items.append(item)
        self.open = item
        out.append(self._event(ResponseOutputItemAddedEvent, item=item.model(), output_index=item.index))
        if item.type != "function_call":
            ids = {"item_id": item.id, "output_index": item.index, "content_index": 0}
            out.append(self._event(ResponseContentPartAddedEvent, part=item.part(), **ids))
        return out

    def _close(self, status: str) -> list[BaseModel]:
        item, self.open = self.open, None
        if item is None:
            return []
        item.status = status
        ids = {"item_id": item.id, "output_index": item.index}
        if item.type == "function_call":
            out = [self._event(ResponseFunctionCallArgumentsDoneEvent, arguments=item.text, name=item.name, **ids)]
        else:
            cls = ResponseTextDoneEvent if item.type == "message" else ResponseReasoningTextDoneEvent
            extra = {"logprobs": []} if item.type == "message" else {}
            out = [
                self._event(cls, text=item.text, content_index=0, **ids, **extra),
                self._event(ResponseContentPartDoneEvent, part=item.part(), content_index=0, **ids),
            ]
        out.append(self._event(ResponseOutputItemDoneEvent, item=item.model(), output_index=item.index))
        return out

    async def collect(self, events: AsyncIterator[ChatEvent]) -> Response:
        self.start()
        async for event in events:
            self.feed(event)
        assert self.finish is not None, "chat events always end with Finish"
        return self.response()

    async def sse(self, events: AsyncIterator[ChatEvent]) -> SSEvents:
        for item in self.start():
            yield _sse(item)
        async for event in events:
            for item in self.feed(event):
                yield _sse(item)

    def sse_error(self, error: ServiceError) -> list[dict]:
        # The status line is long gone: report in-band, and the stream ends after it.
        fields = {"code": error.code or error.type, "message": error.message, "param": error.param}
        return [_sse(self._event(ResponseErrorEvent, **fields))]


def _sse(event: BaseModel) -> dict:
    return {"event": event.type, "data": event.model_dump_json(exclude_unset=True)}


def _not_stored(response_id: str, status: int = 404) -> ServiceError:
    return ServiceError(
        status,
        f"No response '{response_id}' can be found: {STATELESS}, so they cannot be retrieved, listed, cancelled "
        "or deleted. Keep the response you received and send its output items back as input.",
        "invalid_request_error",
        "response_not_stored",
        "response_id",
    )


def router(serving: Serving) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/responses", response_model=None, responses={200: RESPONSES_200})
    async def create_response(
        body: ResponsesRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> JSONResponse | HTTPResponse:
        builder = ResponseBuilder(serving.runtime.model_name, _echo(body))
        try:
            run = await serving.start(
                request,
                body.model,
                lambda: to_chat_request(body),
                response_id=builder.id,
                stream=body.stream,
                job_id=job_id,
            )
        except ServiceError as exc:
            exc.param = _PARAMS.get(exc.param, exc.param)
            raise
        if body.stream:
            return run.stream(builder.sse, builder.sse_error)
        return await run.reply(request, builder.collect, lambda r: r.model_dump(mode="json", exclude_unset=True))

    @api.get("/v1/responses/{response_id}", response_model=None)
    async def retrieve_response(response_id: str) -> None:
        raise _not_stored(response_id)

    @api.delete("/v1/responses/{response_id}", response_model=None)
    async def delete_response(response_id: str) -> None:
        raise _not_stored(response_id)

    @api.get("/v1/responses/{response_id}/input_items", response_model=None)
    async def list_input_items(response_id: str) -> None:
        raise _not_stored(response_id)

    @api.post("/v1/responses/{response_id}/cancel", response_model=None)
    async def cancel_response(response_id: str) -> None:
        # OpenAI answers 400 for a response that is not a background one; no response here ever is.
        raise _not_stored(response_id, 400)

    return api
