"""The settings become one EngineConfig, and the engine fills the device's defaults into its own copy."""

from llmchat.engine import Engine, EngineConfig, SchedulerConfig
from llmchat.lifecycle import engine_config
from llmchat.settings import Settings


def test_the_settings_become_one_engine_config():
    settings = Settings(
        max_running=8,
        max_batched_tokens=256,
        max_waiting=3,
        forward="transformers",
        prefix_cache_mb=64,
        kv_pool_mb=100,
        jump_forward=False,
        int4_rows=0,
        compile=True,
        cuda_graphs=True,
    )
    assert engine_config(settings) == EngineConfig(
        SchedulerConfig(8, 256, 3),
        fused_forward=False,
        cuda_graphs=True,
        prefix_cache_bytes=64 * 2**20,
        jump_forward=False,
        int4_rows=0,
        compile_decode=True,
        pool_bytes=100 * 2**20,
    )
    assert engine_config(Settings(prefix_cache=False, prefix_cache_mb=64)).prefix_cache_bytes == 0
    defaults = engine_config(Settings())
    assert defaults.scheduler.max_running is None and defaults.scheduler.max_batched_tokens is None
    assert defaults.prefix_cache_bytes is None and defaults.pool_bytes is None and defaults.fused_forward


def test_the_engine_fills_device_defaults_into_its_own_copy(loaded):
    config = EngineConfig(SchedulerConfig(None, None))
    engine = Engine(loaded, config)
    try:
        assert (engine.scheduler.config.max_running, engine.scheduler.config.max_batched_tokens) == (64, 512)
        assert config.scheduler.max_running is None and config.scheduler.max_batched_tokens is None
    finally:
        engine.shutdown()
