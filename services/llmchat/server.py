"""The llmchat app: create_app(), the lifespan that loads the model, and thin routes."""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from openai.types import Model
from opentelemetry import trace
from sse_starlette import EventSourceResponse

from hrserve import (
    ClientDisconnected,
    Drain,
    DrainMiddleware,
    OTELContext,
    RequestIdMiddleware,
    ResponseMetadata,
    ServiceError,
    bad_request,
    cancel_on_disconnect,
    client_job_id,
    document_errors,
    install_access_controls,
    install_error_handlers,
    instrument_app,
    setup_otel,
    shutdown_otel,
)
from llmchat import __version__
from llmchat.chat import Chat, ChatError, Finish, GenerationError, Notice
from llmchat.engine import Engine, QueueFull
from llmchat.observe import ChatObservation, Instruments, register_engine_gauges
from llmchat.openai_chat import ResponseInfo, stream_chunks, to_chat_request, to_response
from llmchat.openai_types import ChatCompletionRequest
from llmchat.runtime import Runtime, chat_options, load_in_background, served_name
from llmchat.settings import Settings

log = logging.getLogger("llmchat.server")
# One server-sent event; its data is the JSON of a chat.completion.chunk, an error envelope, or [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
CHAT_200 = {
    "description": "A chat.completion object, or with `stream: true` server-sent chat.completion.chunk events.",
    "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}},
}
SERVICE = "llmchat"


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app; with `engine` given (tests), no model is loaded."""
    tracer, meter = setup_otel(SERVICE, __version__)
    otel = OTELContext(tracer, SERVICE)
    instruments = Instruments.create(meter)
    register_engine_gauges(meter, lambda: runtime.engine)
    runtime = Runtime(model_name=engine.loaded.name if engine else served_name(settings))
    drain = Drain(settings.drain_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if engine is not None:
            runtime.chat = Chat(engine, chat_options(settings))
            engine.start()
            runtime.engine, runtime.status, runtime.stage = engine, "ok", "ready"
        else:
            loader = asyncio.create_task(load_in_background(runtime, settings))
        watchdog = runtime.start_watchdog()
        yield
        watchdog.stop()
        if loader is not None:
            loader.cancel()
        if runtime.engine is not None:
            await asyncio.to_thread(runtime.engine.shutdown)
        shutdown_otel()

    app = FastAPI(title="llmchat", version=__version__, lifespan=lifespan)
    instrument_app(app)
    app.state.runtime = runtime
    app.state.drain = drain
    app.add_middleware(DrainMiddleware, drain=drain)
    install_access_controls(app, settings)
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    document_errors(app)

    @app.get(
        "/health", responses={503: {"description": "Loading, draining or failed: the same body, with the reason."}}
    )
    async def health() -> JSONResponse:
        body = {
            "status": runtime.status,
            "service": SERVICE,
            "version": __version__,
            "model": runtime.model_name,
            "stage": runtime.stage,
            "uptime_seconds": round(time.monotonic() - runtime.started_at, 1),
        }
        if runtime.engine is not None:
            body |= runtime.engine.loaded.describe() | {
                "model": runtime.model_name,
                "ready_seconds": runtime.ready_seconds and round(runtime.ready_seconds, 2),
                "engine_alive": runtime.engine.is_alive,
                "num_waiting": runtime.engine.num_waiting,
                "num_running": runtime.engine.num_running,
            }
            if runtime.chat is not None:
                body["tool_parser"] = runtime.chat.family
            if not runtime.engine.is_alive:
                body["status"] = "error"
        if runtime.error:
            body["error"] = runtime.error
        if drain.is_draining:
            body["status"], body["num_in_flight"] = "draining", drain.num_in_flight
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    def model_card() -> dict:
        created = int(time.time() - (time.monotonic() - runtime.started_at))
        return Model(id=runtime.model_name, object="model", created=created, owned_by=SERVICE).model_dump()

    @app.get("/v1/models")
    async def list_models() -> dict:
        runtime.require_engine()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        runtime.require_engine()
        check_model(model_id)
        return model_card()

    def check_model(name: str) -> None:
        if name != runtime.model_name:
            raise ServiceError(
                404,
                f"The model '{name}' does not exist. This server serves '{runtime.model_name}'.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    @app.post("/v1/chat/completions", response_model=None, responses={200: CHAT_200})
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> JSONResponse | EventSourceResponse:
        chat = runtime.require_chat()
        check_model(body.model)
        try:
            chat_request = to_chat_request(body)
        except ChatError as exc:
            raise _invalid(exc) from None
        obs = ChatObservation(
            otel,
            instruments,
            runtime.model_name,
            chat_request,
            stream=body.stream,
            num_messages=len(body.messages),
            client_job_id=job_id,
            server=(request.url.hostname or settings.host, request.url.port or settings.port),
        )
        info = ResponseInfo(model=runtime.model_name)
        obs.response_id(info.id, info.model)
        try:
            with trace.use_span(obs.span, end_on_exit=False):
                prepared = await chat.prepare(chat_request)
                seq = chat.start(prepared)
                obs.started(seq)
        except ChatError as exc:
            obs.fail("invalid_request")
            obs.end()
            raise _invalid(exc) from None
        except QueueFull as exc:
            obs.fail("queue_full")
            obs.end()
            raise _busy(exc) from None
        except BaseException as exc:
            obs.fail(type(exc).__name__, exc)
            obs.end()
            raise
        meta = ResponseMetadata(OTELContext.get_trace_id(obs.span), OTELContext.get_span_id(obs.span), job_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = _sse(chat.events(prepared, seq), obs, info, include_usage)
            return EventSourceResponse(sse, headers=meta.headers(), sep="\n", ping=15)
        try:
            collect = to_response(_observed(chat.events(prepared, seq), obs), info)
            response, _ = await cancel_on_disconnect(request, collect)
        except ClientDisconnected:
            # Cancelling the collection aborted the sequence; nobody is left to read a response.
            obs.disconnected()
            return Response(status_code=499)
        except GenerationError as exc:
            obs.fail("generation_error", exc)
            raise _generation_failed(exc) from None
        except BaseException as exc:
            obs.fail(type(exc).__name__, exc)
            raise
        finally:
            obs.end()
        return JSONResponse(response.model_dump(mode="json", exclude_unset=True), headers=meta.headers())

    return app


def _invalid(exc: ChatError) -> ServiceError:
    return bad_request(exc.message, exc.param, exc.code)


def _busy(exc: QueueFull) -> ServiceError:
    return ServiceError(
        429,
        f"The server is at capacity ({exc}); retry after a few seconds.",
        "rate_limit_error",
        "rate_limit_exceeded",
        headers={"Retry-After": "2"},
    )


def _generation_failed(exc: GenerationError) -> ServiceError:
    return ServiceError(500, f"Generation failed: {exc}", "server_error", "generation_error")


async def _observed(stream, obs: ChatObservation):
    """Shows every event to the observation; notices go no further."""
    async for event in stream:
        obs.event(event)
        if not isinstance(event, Notice):
            yield event


async def _sse(events, obs: ChatObservation, info: ResponseInfo, include_usage: bool):
    """The SSE body; cancellation (the client hung up) aborts generation via the event stream."""
    try:
        async for item in stream_chunks(_observed(events, obs), info, include_usage):
            if not isinstance(item, Finish):
                yield {"data": item}
        yield {"data": "[DONE]"}
    except GenerationError as exc:
        # Status and headers are gone already: report in-band, then close cleanly.
        obs.fail("generation_error", exc)
        yield {"data": json.dumps(_generation_failed(exc).body())}
        yield {"data": "[DONE]"}
    except asyncio.CancelledError:
        obs.disconnected()
        raise
    finally:
        obs.end()
