"""OpenAI Responses API, stateless: POST /v1/responses -> ChatRequest, ChatEvents -> one Response or its
stream of typed events. The stored-response routes answer that nothing is stored."""

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Request
from fastapi import Response as HTTPResponse
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
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_reasoning_item import Content as ReasoningContent
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import BaseModel

from hrserve import ServiceError, client_job_id
from llmchat.api.common import sse
from llmchat.api.openapi import JsonText, ok_responses
from llmchat.api.responses_request import NAMES, STATELESS, echo_settings, to_chat_request
from llmchat.api.responses_types import (
    ResponsesRequest,
)
from llmchat.api.serving import Reply, Serving, WireEvent
from llmchat.chat import (
    ChatEvent,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallCut,
    ToolCallDelta,
    ToolCallStart,
)


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
class ResponseReply(Reply):
    """Chat events -> the Responses stream events; the final Response comes from the same state, so the
    streamed and the whole response cannot disagree."""

    model: str
    echo: dict[str, Any]
    id: str = field(default_factory=lambda: _new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    items: list[_Item] = field(default_factory=list)
    open: _Item | None = None
    calls: dict[int, _Item] = field(default_factory=dict)
    cut: set[int] = field(default_factory=set)  # output indices of calls the output ended inside
    finish: Finish | None = None
    sequence_number: int = 0
    named_events = True

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
                # A call cut by max_output_tokens has arguments that are not JSON: streamed as an incomplete
                # item, but left out of the response's output (finish status incomplete tells why).
                "output": [item.model() for item in self.items if item.index not in self.cut],
                "usage": ResponseUsage(
                    input_tokens=finish.prompt_tokens,
                    input_tokens_details=InputTokensDetails(cached_tokens=finish.cached_tokens, cache_write_tokens=0),
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

    def start(self, num_prompt_tokens: int) -> list[WireEvent]:
        return [
            self._event(ResponseCreatedEvent, response=self.response()),
            self._event(ResponseInProgressEvent, response=self.response()),
        ]

    def feed(self, event: ChatEvent, choice: int = 0) -> list[WireEvent]:
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
        if isinstance(event, ToolCallCut):
            self.cut.add(self.calls[event.index].index)
            return []
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

    def stream_error(self, error: ServiceError) -> list[dict]:
        # The status line is long gone: report in-band, and the stream ends after it.
        fields = {"code": error.code or error.type, "message": error.message, "param": error.param}
        return [sse(self._event(ResponseErrorEvent, **fields), named=True)]


def _not_stored(response_id: str, status: int = 404) -> ServiceError:
    return ServiceError(
        status,
        f"No response '{response_id}' can be found: {STATELESS}, so they cannot be retrieved, listed, cancelled "
        "or deleted. Keep the response you received and send its output items back as input.",
        "invalid_request_error",
        "response_not_stored",
        "response_id",
    )


# Never built: it describes the stream's events in /openapi.json (its docstring is the schema's description).
class ResponseSSE(BaseModel):
    """One server-sent event of a streamed response, named by its `type`; an error after the status line
    went out is an `error` event."""

    event: str
    data: Annotated[ResponseStreamEvent, JsonText()]


def router(serving: Serving) -> APIRouter:
    api = APIRouter()
    ok = ok_responses(
        "A response object, or with `stream: true` server-sent events named by their `type`.", Response, ResponseSSE
    )

    @api.post("/v1/responses", response_model=None, responses=ok)
    async def create_response(
        body: ResponsesRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> HTTPResponse:
        return await serving.respond(
            request,
            model=body.model,
            build=lambda: to_chat_request(body),
            reply=ResponseReply(serving.runtime.model_name, echo_settings(body)),
            stream=body.stream,
            job_id=job_id,
            names=NAMES,
        )

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
