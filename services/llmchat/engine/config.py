"""What the engine is told, in one object: the service builds it from its settings (lifecycle.engine_config)."""

from dataclasses import dataclass, field

from llmchat.engine.scheduler import SchedulerConfig


@dataclass
class EngineConfig:
    # Batch bounds; a max_running or max_batched_tokens of None is chosen for the device (GPU-sized on a GPU).
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # llmchat's fused forward pass where the model allows it (False: transformers' forward).
    fused_forward: bool = True
    # Decode steps replayed from CUDA graphs (on a GPU), captured by Engine.prepare().
    cuda_graphs: bool = False
    # The prefix cache: 0 turns it off; otherwise, without the paged pool, its bound (None: from free memory).
    prefix_cache_bytes: int | None = None
    # Tokens a grammar forces are appended without a model step for each.
    jump_forward: bool = True
    # Decode steps of up to this many rows use a GGUF's 4-bit weights on the CPU (None: measured at load; 0: never).
    int4_rows: int | None = None
    # One-row decode steps on the CPU run compiled by torch.compile (compiled by Engine.prepare()).
    compile_decode: bool = False
    # The paged KV pool's size in bytes (None: from free memory), where the fused pass runs.
    pool_bytes: int | None = None
