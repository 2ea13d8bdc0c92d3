"""The llmchat app: create_app(), the lifespan that loads the model, and thin routes."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from openai.types import Model

from hrserve import (
    Drain,
    DrainMiddleware,
    OTELContext,
    RequestIdMiddleware,
    client_job_id,
    document_errors,
    install_access_controls,
    install_error_handlers,
    instrument_app,
    setup_otel,
    shutdown_otel,
)
from llmchat import __version__, anthropic_messages, openai_completions, openai_responses
from llmchat.chat import Chat, Finish
from llmchat.engine import Engine
from llmchat.observe import Instruments, register_engine_gauges
from llmchat.openai_chat import ResponseInfo, stream_chunks, to_chat_request, to_response
from llmchat.openai_types import ChatCompletionRequest
from llmchat.runtime import Runtime, chat_options, load_in_background, served_name
from llmchat.serving import Serving, openai_sse_error
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
    serving = Serving(runtime, otel, instruments, settings.host, settings.port)

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
                **runtime.engine.describe(),
                "engine_alive": runtime.engine.is_alive,
                "num_waiting": runtime.engine.num_waiting,
                "num_running": runtime.engine.num_running,
            }
            if runtime.chat is not None:
                body["tool_parser"] = runtime.chat.family
                body["reasoning_parser"] = "think" if runtime.chat.reasons else "none"
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
        serving.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None, responses={200: CHAT_200})
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> JSONResponse | Response:
        info = ResponseInfo(model=runtime.model_name, logprobs=body.logprobs)
        run = await serving.start(
            request, body.model, lambda: to_chat_request(body), response_id=info.id, stream=body.stream, job_id=job_id
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return run.stream(lambda events: _chat_sse(events, info, include_usage), openai_sse_error)
        return await run.reply(request, lambda events: to_response(events, info), _openai_json)

    app.include_router(openai_responses.router(serving))
    app.include_router(openai_completions.router(serving))
    app.include_router(anthropic_messages.router(serving))
    return app


def _openai_json(result: tuple) -> dict:
    return result[0].model_dump(mode="json", exclude_unset=True)


async def _chat_sse(events, info: ResponseInfo, include_usage: bool):
    async for item in stream_chunks(events, info, include_usage):
        if not isinstance(item, Finish):
            yield {"data": item}
    yield {"data": "[DONE]"}
