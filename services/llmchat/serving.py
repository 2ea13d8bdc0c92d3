"""One generation's life on the HTTP side, shared by every protocol route.

A route turns its wire request into a ChatRequest, calls Serving.start() (everything that can be
refused is refused there, before a byte of the response), then either collects the events into one
response (Run.collect) or streams them (Run.stream). Telemetry, disconnects, in-band errors and the
end of the span are handled here once, so the protocols differ only in their wire formats.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from sse_starlette import EventSourceResponse

from hrserve import (
    ClientDisconnected,
    OTELContext,
    ResponseMetadata,
    ServiceError,
    bad_request,
    cancel_on_disconnect,
)
from llmchat.chat import Chat, ChatError, ChatEvent, ChatRequest, GenerationError, Notice, PreparedChat
from llmchat.engine import QueueFull, Sequence
from llmchat.observe import ChatObservation, Instruments
from llmchat.runtime import Runtime

log = logging.getLogger("llmchat.serving")
T = TypeVar("T")
# The server-sent events a route streams: sse-starlette's dicts (`data`, and `event` where the protocol
# names its events).
SSEvents = AsyncIterator[dict]


@dataclass(slots=True)
class Serving:
    """What every generating route needs: the model's runtime and the telemetry."""

    runtime: Runtime
    otel: OTELContext
    instruments: Instruments
    host: str
    port: int

    def check_model(self, name: str) -> None:
        if name != self.runtime.model_name:
            raise ServiceError(
                404,
                f"The model '{name}' does not exist. This server serves '{self.runtime.model_name}'.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    async def start(
        self,
        request: Request,
        model: str,
        build: Callable[[], ChatRequest],
        *,
        response_id: str,
        stream: bool,
        job_id: str | None,
        operation: str = "chat",
    ) -> "Run":
        """Checks the model, builds the ChatRequest (build() raises ChatError for what the wire request cannot
        ask), prepares and queues the generation; raises ServiceError (400, 404, 429, 503) before any response
        starts."""
        self.check_model(model)
        try:
            chat_request = build()
        except ChatError as exc:
            raise invalid(exc) from None
        chat = self.runtime.require_chat()
        obs = ChatObservation(
            self.otel,
            self.instruments,
            self.runtime.model_name,
            chat_request,
            stream=stream,
            num_messages=len(chat_request.messages) or 1,  # a raw prompt counts as one
            client_job_id=job_id,
            server=(request.url.hostname or self.host, request.url.port or self.port),
            operation=operation,
        )
        obs.response_id(response_id, self.runtime.model_name)
        try:
            with trace.use_span(obs.span, end_on_exit=False):
                prepared = await chat.prepare(chat_request)
                seq = chat.start(prepared)
                obs.started(seq)
        except ChatError as exc:
            obs.fail("invalid_request")
            obs.end()
            raise invalid(exc) from None
        except QueueFull as exc:
            obs.fail("queue_full")
            obs.end()
            raise busy(exc) from None
        except BaseException as exc:
            obs.fail(type(exc).__name__, exc)
            obs.end()
            raise
        meta = ResponseMetadata(OTELContext.get_trace_id(obs.span), OTELContext.get_span_id(obs.span), job_id)
        return Run(chat, prepared, seq, obs, meta.headers())


@dataclass(slots=True)
class Run:
    """A queued generation: its events, for one response or a stream, and its observation."""

    chat: Chat
    prepared: PreparedChat
    seq: Sequence
    obs: ChatObservation
    headers: dict[str, str]

    @property
    def num_prompt_tokens(self) -> int:
        return self.prepared.num_prompt_tokens

    async def events(self) -> AsyncIterator[ChatEvent]:
        """The chat events, each shown to the observation; notices stop there. Leaving early aborts."""
        async for event in self.chat.events(self.prepared, self.seq):
            self.obs.event(event)
            if not isinstance(event, Notice):
                yield event

    async def collect(
        self, request: Request, build: Callable[[AsyncIterator[ChatEvent]], Awaitable[T]]
    ) -> T | Response:
        """build(events) -> one response body; a client that hangs up first aborts the generation (499)."""
        try:
            return await cancel_on_disconnect(request, build(self.events()))
        except ClientDisconnected:
            # Cancelling the collection aborted the sequence; nobody is left to read a response.
            self.obs.disconnected()
            return Response(status_code=499)
        except GenerationError as exc:
            self.obs.fail("generation_error", exc)
            raise generation_failed(exc) from None
        except BaseException as exc:
            self.obs.fail(type(exc).__name__, exc)
            raise
        finally:
            self.obs.end()

    async def reply(
        self, request: Request, build: Callable[[AsyncIterator[ChatEvent]], Awaitable[T]], dump: Callable[[T], dict]
    ) -> Response:
        """The one JSON response: build(events) -> a body object, dump(body) -> its JSON (trace headers added)."""
        body = await self.collect(request, build)
        if isinstance(body, Response):
            return body
        return JSONResponse(dump(body), headers=self.headers)

    def stream(
        self,
        body: Callable[[AsyncIterator[ChatEvent]], SSEvents],
        on_error: Callable[[ServiceError], list[dict]],
    ) -> EventSourceResponse:
        """body(events) -> the protocol's server-sent events; a generation error after the status line is
        reported in-band with on_error(error) and the stream closes cleanly."""
        return EventSourceResponse(self._sse(body, on_error), headers=self.headers, sep="\n", ping=15)

    async def _sse(self, body, on_error) -> SSEvents:
        try:
            async for item in body(self.events()):
                yield item
        except GenerationError as exc:
            self.obs.fail("generation_error", exc)
            for item in on_error(generation_failed(exc)):
                yield item
        except asyncio.CancelledError:
            # The client hung up: cancelling the event stream aborted the sequence.
            self.obs.disconnected()
            raise
        finally:
            self.obs.end()


def openai_sse_error(error: ServiceError) -> list[dict]:
    """OpenAI's in-band stream error (chat and completions): the status line is gone, so the envelope goes in a
    data event and the stream ends as usual."""
    return [{"data": json.dumps(error.body())}, {"data": "[DONE]"}]


def invalid(exc: ChatError) -> ServiceError:
    return bad_request(exc.message, exc.param, exc.code)


def busy(exc: QueueFull) -> ServiceError:
    return ServiceError(
        429,
        f"The server is at capacity ({exc}); retry after a few seconds.",
        "rate_limit_error",
        "rate_limit_exceeded",
        headers={"Retry-After": "2"},
    )


def generation_failed(exc: GenerationError) -> ServiceError:
    return ServiceError(500, f"Generation failed: {exc}", "server_error", "generation_error")
