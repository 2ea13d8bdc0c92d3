"""One generation's life on the HTTP side, shared by every protocol route.

An adapter's route hands Serving.respond() its request mapper (wire request -> ChatRequest) and its Reply
(ChatEvents -> the whole response or its server-sent events). Everything that can be refused is refused
before a byte of the response; then the Generation's events are folded into one response or streamed.
Telemetry, disconnects, in-band errors and the end of the span are handled here once, so the protocols
differ only in their wire formats.
"""

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from hrserve import (
    ClientDisconnected,
    OTELContext,
    ResponseMetadata,
    ServiceError,
    bad_request,
    cancel_on_disconnect,
)
from llmchat.api.common import dump, sse
from llmchat.chat import Chat, ChatError, ChatEvent, ChatRequest, Finish, GenerationError, Notice, PreparedChat
from llmchat.engine import QueueFull, Sequence
from llmchat.lifecycle import Runtime
from llmchat.observe import ChatObservation, Instruments

# The server-sent events a route streams: sse-starlette's dicts (`data`, and `event` where the protocol
# names its events).
SSEvents = AsyncIterator[dict]
# A wire event: one of the protocol's event or chunk objects, or a bare marker such as OpenAI's [DONE].
WireEvent = BaseModel | str


class Reply(ABC):
    """One protocol's answer, built from the chat events in one place: feed() turns each event into the
    protocol's stream events and keeps what the whole response needs, so a streamed answer and a whole
    answer cannot disagree. Streams send start(), feed() of every event, then close(); a whole response is
    response() after the same calls."""

    id: str  # the response's id, also on the span
    named_events: bool = False  # server-sent events carry `event: <type>`

    def start(self, num_prompt_tokens: int) -> list[WireEvent]:
        return []

    @abstractmethod
    def feed(self, event: ChatEvent, choice: int = 0) -> list[WireEvent]:
        """`choice`: which of the request's n choices the event belongs to (always 0 where n is 1)."""

    def close(self) -> list[WireEvent]:
        return []

    @abstractmethod
    def response(self) -> BaseModel:
        """The whole response, once the last event (Finish) was fed."""

    @abstractmethod
    def stream_error(self, error: ServiceError) -> list[dict]:
        """The server-sent events that report an error after the status line went out."""


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

    async def respond(
        self,
        request: Request,
        *,
        model: str,
        build: Callable[[], ChatRequest],
        reply: Reply,
        stream: bool,
        job_id: str | None,
        operation: str = "chat",
        names: Mapping[str, str] | None = None,
    ) -> Response:
        """A protocol route's whole life: the generation started (or refused with the protocol's field
        `names` for the chat core's), then one JSON response or its stream."""
        generation = await self.start(
            request, model, build, response_id=reply.id, stream=stream, job_id=job_id, operation=operation, names=names
        )
        if stream:
            return generation.stream(reply)
        return await generation.whole(request, reply)

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
        names: Mapping[str, str] | None = None,
    ) -> "Generation":
        """Checks the model, builds the ChatRequest (build() raises ChatError for what the wire request cannot
        ask), prepares and queues the generation; raises ServiceError (400, 404, 429, 503) before any response
        starts."""
        self.check_model(model)
        try:
            chat_request = build()
        except ChatError as exc:
            raise invalid(exc, names) from None
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
                seqs = chat.start(prepared)
                obs.started(seqs[0])
        except ChatError as exc:
            obs.fail("invalid_request")
            obs.end()
            raise invalid(exc, names) from None
        except QueueFull as exc:
            obs.fail("queue_full")
            obs.end()
            raise busy(exc) from None
        except BaseException as exc:
            obs.fail(type(exc).__name__, exc)
            obs.end()
            raise
        meta = ResponseMetadata(OTELContext.get_trace_id(obs.span), OTELContext.get_span_id(obs.span), job_id)
        return Generation(chat, prepared, seqs, obs, meta.headers())


@dataclass(slots=True)
class Generation:
    """A queued generation: its events, for one response or a stream, and its observation."""

    chat: Chat
    prepared: PreparedChat
    seqs: list[Sequence]  # one per choice
    obs: ChatObservation
    headers: dict[str, str]

    @property
    def num_prompt_tokens(self) -> int:
        return self.prepared.num_prompt_tokens

    async def events(self) -> AsyncIterator[tuple[int, ChatEvent]]:
        """Each choice's chat events as they come, with the choice's index; every one is shown to the
        observation (choice 0's output, and one Finish for all), notices stop there. Leaving early aborts all."""
        streams = [self.chat.events(p, s) for p, s in zip(self.prepared.choices, self.seqs, strict=True)]
        finishes: list[Finish] = []
        async for index, event in merge(streams):
            if isinstance(event, Finish):
                finishes.append(event)
                if len(finishes) == len(streams):
                    self.obs.event(finishes[0] if len(finishes) == 1 else combined(finishes))
            elif index == 0 or isinstance(event, Notice):
                self.obs.event(event)
            if not isinstance(event, Notice):
                yield index, event

    async def whole(self, request: Request, reply: Reply) -> Response:
        """The one JSON response (trace headers added); a client that hangs up first aborts the generation (499)."""
        try:
            body = await cancel_on_disconnect(request, whole_response(reply, self.events(), self.num_prompt_tokens))
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
        return JSONResponse(dump(body), headers=self.headers)

    def stream(self, reply: Reply) -> EventSourceResponse:
        """The reply's server-sent events; a generation error after the status line is reported in-band
        (reply.stream_error) and the stream closes cleanly."""
        return EventSourceResponse(self._sse(reply), headers=self.headers, sep="\n", ping=15)

    async def _sse(self, reply: Reply) -> SSEvents:
        try:
            async for item in stream_events(reply, self.events(), self.num_prompt_tokens):
                yield item
        except GenerationError as exc:
            self.obs.fail("generation_error", exc)
            for item in reply.stream_error(generation_failed(exc)):
                yield item
        except asyncio.CancelledError:
            # The client hung up: cancelling the event stream aborted the sequence.
            self.obs.disconnected()
            raise
        finally:
            self.obs.end()


async def merge(streams: list[AsyncIterator[ChatEvent]]) -> AsyncIterator[tuple[int, ChatEvent]]:
    """The events of several streams in the order they come, each with its stream's index. Closing it (or an
    error in one stream) closes every stream, which aborts their sequences."""
    if len(streams) == 1:  # every n=1 request: no task per event
        async with contextlib.aclosing(streams[0]) as only:
            async for event in only:
                yield 0, event
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                yield index, event
                pending[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def combined(finishes: list[Finish]) -> Finish:
    """One Finish for the observation of n choices: the prompt once, the completions and steps summed, every
    choice's reason."""
    first = finishes[0]
    return Finish(
        first.reason,
        first.prompt_tokens,
        sum(f.completion_tokens for f in finishes),
        cached_tokens=first.cached_tokens,
        model_steps=sum(f.model_steps for f in finishes),
        reasons=[f.reason for f in finishes],
    )


async def whole_response(
    reply: Reply, events: AsyncIterator[tuple[int, ChatEvent]], num_prompt_tokens: int
) -> BaseModel:
    """The reply's whole response, fed the same calls its stream would be."""
    reply.start(num_prompt_tokens)
    async for choice, event in events:
        reply.feed(event, choice)
    reply.close()
    return reply.response()


async def stream_events(reply: Reply, events: AsyncIterator[tuple[int, ChatEvent]], num_prompt_tokens: int) -> SSEvents:
    """The reply's server-sent events, in order."""
    for item in reply.start(num_prompt_tokens):
        yield sse(item, reply.named_events)
    async for choice, event in events:
        for item in reply.feed(event, choice):
            yield sse(item, reply.named_events)
    for item in reply.close():
        yield sse(item, reply.named_events)


def invalid(exc: ChatError, names: Mapping[str, str] | None = None) -> ServiceError:
    """A 400 for a refused request, its fields named as the protocol names them."""
    names = names or {}
    return bad_request(exc.wire_message(names), exc.wire_param(names), exc.code)


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
