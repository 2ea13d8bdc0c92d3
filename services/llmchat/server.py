"""The llmchat app: create_app(), the lifespan that loads the model, and thin routes."""

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from openai.types import Model
from opentelemetry import trace
from sse_starlette import EventSourceResponse

from hrserve import (
    ClientDisconnected,
    OTELContext,
    RequestIdMiddleware,
    ResponseMetadata,
    ServiceError,
    bad_request,
    cancel_on_disconnect,
    client_job_id,
    install_error_handlers,
    not_ready,
    setup_otel,
    shutdown_otel,
)
from llmchat import __version__
from llmchat.chat import Chat, ChatError, ChatOptions, Finish, GenerationError, Notice
from llmchat.engine import Engine, QueueFull, SchedulerConfig
from llmchat.llm import ModelConfig, ModelLoadError, load_model, resolve_source
from llmchat.observe import ChatObservation, Instruments
from llmchat.openai_chat import ResponseInfo, stream_chunks, to_chat_request, to_response
from llmchat.openai_types import ChatCompletionRequest
from llmchat.settings import Settings

log = logging.getLogger("llmchat.server")
SERVICE = "llmchat"


@dataclass(slots=True)
class Runtime:
    """What the app knows about its model: loading, ready (with an engine) or failed."""

    model_name: str
    status: str = "loading"  # loading | ok | error
    stage: str = "starting"
    engine: Engine | None = None
    chat: Chat | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None
    on_load_failure: Callable[[], None] | None = None

    def require_chat(self) -> Chat:
        self.require_engine()
        assert self.chat is not None, "the chat core is set with the engine"
        return self.chat

    def require_engine(self) -> Engine:
        if self.status == "loading":
            raise not_ready(f"The model is still loading ({self.stage}); retry shortly.")
        if self.engine is None or not self.engine.is_alive:
            raise ServiceError(
                503,
                "The model is not available: " + (self.error or "the engine stopped."),
                "service_unavailable",
                "model_not_ready",
            )
        return self.engine


def _model_config(settings: Settings) -> ModelConfig:
    return ModelConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        quantization=settings.quantization,
        max_context=settings.max_context,
        cache_dir=settings.cache_dir,
        served_model_name=settings.served_model_name,
    )


def _served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    try:
        return resolve_source(settings.model).name
    except ModelLoadError:
        return settings.model


def _chat_options(settings: Settings) -> ChatOptions:
    return ChatOptions(
        tool_parser=settings.tool_parser,
        validate_tool_names=settings.validate_tool_names,
        tool_prompt=settings.tool_prompt,
        chat_template=settings.chat_template,
    )


async def _load_in_background(
    runtime: Runtime, config: ModelConfig, scheduler_config: SchedulerConfig, options: ChatOptions
) -> None:
    def stage(text: str) -> None:
        runtime.stage = text
        log.info("model: %s", text)

    result: asyncio.Future = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def work() -> None:
        try:
            loaded = load_model(config, stage)
            engine = Engine(loaded, scheduler_config)
            chat = Chat(engine, options)
            stage(f"preparing constrained decoding ({chat.family} tool calls)")
            chat.grammar  # noqa: B018 -- built now so the first tool request does not pay for it
            engine.start()
            loop.call_soon_threadsafe(result.set_result, chat)
        except BaseException as exc:
            loop.call_soon_threadsafe(result.set_exception, exc)

    # A daemon thread, so a stop during a long first conversion does not wait for it.
    threading.Thread(target=work, name="llmchat-load", daemon=True).start()
    try:
        runtime.chat = await result
        runtime.engine = runtime.chat.engine
    except Exception as exc:
        runtime.status, runtime.error = "error", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModelLoadError):
            log.error("model failed to load: %s", exc)
        else:
            log.exception("model failed to load")
        if runtime.on_load_failure is not None:
            runtime.on_load_failure()
        return
    runtime.status, runtime.stage = "ok", "ready"
    runtime.ready_seconds = time.monotonic() - runtime.started_at
    log.info("model: ready in %.1fs %s", runtime.ready_seconds, runtime.engine.loaded.describe())


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app; with `engine` given (tests), no model is loaded."""
    tracer, meter = setup_otel(SERVICE, __version__)
    otel = OTELContext(tracer, SERVICE)
    instruments = Instruments.create(meter)
    runtime = Runtime(model_name=engine.loaded.name if engine else _served_name(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if engine is not None:
            runtime.chat = Chat(engine, _chat_options(settings))
            engine.start()
            runtime.engine, runtime.status, runtime.stage = engine, "ok", "ready"
        else:
            scheduler_config = SchedulerConfig(settings.max_running, settings.max_batched_tokens, settings.max_waiting)
            loader = asyncio.create_task(
                _load_in_background(runtime, _model_config(settings), scheduler_config, _chat_options(settings))
            )
        yield
        if loader is not None:
            loader.cancel()
        if runtime.engine is not None:
            await asyncio.to_thread(runtime.engine.shutdown)
        shutdown_otel()

    app = FastAPI(title="llmchat", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)

    @app.get("/health")
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

    @app.post("/v1/chat/completions", response_model=None)
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
        )
        info = ResponseInfo(model=runtime.model_name)
        obs.response_id(info.id, info.model)
        try:
            with trace.use_span(obs.span, end_on_exit=False):
                prepared = await chat.prepare(chat_request)
                seq = chat.start(prepared)
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
            response, finish = await cancel_on_disconnect(request, collect)
            obs.finish(finish)
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
    """Records first token and notices on the span; notices go no further."""
    async for event in stream:
        if isinstance(event, Notice):
            obs.notice(event)
            continue
        if not isinstance(event, Finish):
            obs.token()
        yield event


async def _sse(events, obs: ChatObservation, info: ResponseInfo, include_usage: bool):
    """The SSE body; cancellation (the client hung up) aborts generation via the event stream."""
    try:
        async for item in stream_chunks(_observed(events, obs), info, include_usage):
            if isinstance(item, Finish):
                obs.finish(item)
            else:
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
