"""The model's life in the app (the runtime): load on a background thread, warm up, tell systemd, keep the watchdog fed.

/health reads Runtime; systemd hears STATUS= lines while loading and READY=1 only once a warm-up
generation has succeeded, so `systemctl --user start llmchat` returns when requests can be served.
"""

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hrserve import ServiceError, Watchdog, not_ready, notify
from hrserve.systemd import extending_start_timeout
from llmchat.chat import Chat, ChatMessage, ChatOptions, ChatRequest
from llmchat.engine import Engine, EngineConfig, SchedulerConfig
from llmchat.engine.loader import ModelConfig, ModelLoadError, load_model, resolve_source
from llmchat.settings import Settings

log = logging.getLogger("llmchat.lifecycle")


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

    def describe(self) -> dict:
        """/health's body but for the service's name and draining: loading, failed, or the engine's and the
        chat layer's own descriptions."""
        body = {
            "status": self.status,
            "model": self.model_name,
            "stage": self.stage,
            "uptime_seconds": round(time.monotonic() - self.started_at, 1),
        }
        if self.engine is not None:
            body |= self.engine.describe() | {
                "model": self.model_name,
                "ready_seconds": self.ready_seconds and round(self.ready_seconds, 2),
            }
            if self.chat is not None:
                body |= self.chat.describe()
            if not self.engine.is_alive:
                body["status"] = "error"
        if self.error:
            body["error"] = self.error
        return body

    def set_stage(self, text: str) -> None:
        self.stage = text
        log.info("model: %s", text)
        notify(f"STATUS={text}")

    def is_healthy(self, max_silence_s: float) -> bool:
        """For the watchdog: loading, or an engine thread that has looped within `max_silence_s`."""
        if self.status == "loading":
            return True
        engine = self.engine
        return engine is not None and engine.is_alive and time.monotonic() - engine.last_beat < max_silence_s

    def start_watchdog(self) -> Watchdog:
        watchdog = Watchdog(lambda: True)
        if watchdog.interval_s:
            # A step longer than half the period withholds one keep-alive, not yet a restart.
            watchdog.is_healthy = lambda: self.is_healthy(watchdog.interval_s / 2)
        watchdog.start()
        return watchdog


def model_config(settings: Settings) -> ModelConfig:
    return ModelConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        quantization=settings.quantization,
        device_map=settings.device_map,
        max_memory=settings.max_memory,
        offload_dir=settings.offload_dir,
        max_context=settings.max_context,
        cache_dir=settings.cache_dir,
        served_model_name=settings.served_model_name,
        trust_remote_code=settings.trust_remote_code,
        remeasure=settings.remeasure,
    )


def served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    try:
        return resolve_source(settings.model).name
    except ModelLoadError:
        return settings.model


def chat_options(settings: Settings) -> ChatOptions:
    return ChatOptions(
        tool_parser=settings.tool_parser,
        validate_tool_names=settings.validate_tool_names,
        bare_tool_calls=settings.bare_tool_calls,
        max_tool_calls=settings.max_tool_calls,
        max_n=settings.max_n,
        tool_prompt=settings.tool_prompt,
        chat_template=settings.chat_template,
        reasoning_parser=settings.reasoning_parser,
    )


async def warm_up(chat: Chat) -> None:
    """One tiny generation through the whole path; raises if the engine cannot generate."""
    request = ChatRequest([ChatMessage("user", "Hi")], max_tokens=2, temperature=0.0)
    prepared = await chat.prepare(request)
    async for _ in chat.events(prepared, chat.start(prepared)[0]):
        pass


async def load_in_background(runtime: Runtime, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()

    def stage(text: str) -> None:
        loop.call_soon_threadsafe(runtime.set_stage, text)

    def work() -> None:
        try:
            # A large model's first conversion can outlast the unit's start timeout.
            loaded = load_model(model_config(settings), stage, while_converting=extending_start_timeout)
            if settings.compile or loaded.device == "cuda":  # LLMCHAT_COMPILE's and FlexAttention's kernels
                # outlive /tmp there, so later starts reuse them
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "inductor"))
            if loaded.device == "cpu":  # where the 4-bit kernel is compiled at first start (engine/dot8.py)
                os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(settings.cache_dir / "kernels"))
            stage("preparing the forward pass")
            engine = Engine(loaded, engine_config(settings))
            if loaded.device == "cuda":  # FlexAttention is checked and compiled there, graphs or not
                graphs = " and capturing CUDA graphs for every batch size" if settings.cuda_graphs else ""
                stage(f"checking FlexAttention over the KV pool{graphs}")
                with extending_start_timeout():
                    engine.prepare()
            elif settings.compile and loaded.device == "cpu":
                stage("compiling the one-row decode step (about a minute the first time)")
                with extending_start_timeout():
                    engine.prepare()
            chat = Chat(engine, chat_options(settings))
            stage(f"preparing constrained decoding ({chat.family} tool calls)")
            chat.grammar  # noqa: B018 -- built now so the first tool request does not pay for it
            engine.start()
            loop.call_soon_threadsafe(result.set_result, chat)
        except BaseException as exc:
            loop.call_soon_threadsafe(result.set_exception, exc)

    # A daemon thread, so a stop during a long first conversion does not wait for it. It also ends before
    # the engine decodes: while another thread that has run torch's OpenMP regions lives, each parallel op
    # on the engine thread was measured several times slower (a second libgomp pool on the same cores).
    threading.Thread(target=work, name="llmchat-load", daemon=True).start()
    try:
        runtime.chat = await result
        runtime.engine = runtime.chat.engine
        runtime.set_stage("warming up")
        await warm_up(runtime.chat)
    except Exception as exc:
        runtime.status, runtime.error = "error", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModelLoadError):
            log.error("model failed to load: %s", exc)
        else:
            log.exception("model failed to load")
        notify(f"STATUS=failed: {runtime.error}")
        if runtime.on_load_failure is not None:
            runtime.on_load_failure()
        return
    runtime.status, runtime.stage = "ok", "ready"
    runtime.ready_seconds = time.monotonic() - runtime.started_at
    details = runtime.engine.loaded.describe()
    log.info("model: ready in %.1fs %s", runtime.ready_seconds, details)
    notify("READY=1", f"STATUS=ready in {runtime.ready_seconds:.0f}s: {runtime.model_name} on {details['device']}")


def engine_config(settings: Settings) -> EngineConfig:
    """What the engine is told, from the settings."""
    if not settings.prefix_cache:
        prefix_cache_bytes: int | None = 0
    else:
        prefix_cache_bytes = None if settings.prefix_cache_mb is None else settings.prefix_cache_mb * 2**20
    return EngineConfig(
        SchedulerConfig(settings.max_running, settings.max_batched_tokens, settings.max_waiting),
        fused_forward=settings.forward == "auto",
        cuda_graphs=settings.cuda_graphs,
        prefix_cache_bytes=prefix_cache_bytes,
        jump_forward=settings.jump_forward,
        int4_rows=settings.int4_rows,
        compile_decode=settings.compile,
        pool_bytes=None if settings.kv_pool_mb is None else settings.kv_pool_mb * 2**20,
    )
