"""The llmchat app: create_app() wires the lifespan that loads the model (lifecycle), the four protocol
adapters' routers and vLLM's tokenizer routes (api), /health and the model list."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from openai.pagination import SyncPage
from openai.types import Model

from hrserve import (
    Drain,
    DrainMiddleware,
    OTELContext,
    RequestIdMiddleware,
    document_errors,
    include_router,
    install_access_controls,
    install_error_handlers,
    instrument_app,
    setup_otel,
    shutdown_otel,
)
from llmchat import __version__
from llmchat.api import anthropic_messages, openai_chat, openai_completions, openai_responses, tokens
from llmchat.api.serving import Serving
from llmchat.chat import Chat
from llmchat.engine import Engine
from llmchat.lifecycle import Runtime, chat_options, load_in_background, served_name
from llmchat.observe import Instruments, register_engine_gauges
from llmchat.settings import Settings

SERVICE = "llmchat"
# /health's body: these fields always, then what the engine and the chat layer describe of themselves.
HEALTH = {
    "type": "object",
    "required": ["status", "service", "version", "model", "stage"],
    "properties": {
        "status": {"enum": ["ok", "loading", "draining", "error"]},
        "service": {"const": SERVICE},
        "version": {"type": "string"},
        "model": {"type": "string"},
        "stage": {"type": "string"},
    },
}


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
    document_errors(app, ("/v1/", *tokens.PATHS))

    @app.get(
        "/health",
        responses={
            200: {"content": {"application/json": {"schema": HEALTH}}},
            503: {
                "description": "Loading, draining or failed: the same body, with the reason.",
                "content": {"application/json": {"schema": HEALTH}},
            },
        },
    )
    async def health() -> JSONResponse:
        body = {"status": "", "service": SERVICE, "version": __version__} | runtime.describe()
        if drain.is_draining:
            body["status"], body["num_in_flight"] = "draining", drain.num_in_flight
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    def model_card() -> dict:
        created = int(time.time() - (time.monotonic() - runtime.started_at))
        return Model(id=runtime.model_name, object="model", created=created, owned_by=SERVICE).model_dump()

    @app.get("/v1/models", response_model=None, responses={200: {"model": SyncPage[Model]}})
    async def list_models() -> dict:
        runtime.require_engine()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=None, responses={200: {"model": Model}})
    async def get_model(model_id: str) -> dict:
        runtime.require_engine()
        serving.check_model(model_id)
        return model_card()

    include_router(app, openai_chat.router(serving))
    include_router(app, openai_responses.router(serving))
    include_router(app, openai_completions.router(serving))
    include_router(app, anthropic_messages.router(serving))
    include_router(app, tokens.router(serving))
    return app
