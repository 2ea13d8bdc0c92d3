"""The inference engine: loads the model (loader), runs it (fused_forward, cuda_graphs, compiled, int4 or transformers'
forward, via runner), batches sequences continuously (scheduler, core) and samples their tokens (sampler, sampling).
It knows nothing of chat templates or wire protocols: token ids in, token ids and text out."""

from llmchat.engine.config import EngineConfig
from llmchat.engine.core import Engine
from llmchat.engine.loader import LoadedModel, ModelConfig, ModelLoadError, load_model
from llmchat.engine.scheduler import Output, QueueFull, SchedulerConfig, Sequence

__all__ = [
    "Engine",
    "EngineConfig",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "Output",
    "QueueFull",
    "SchedulerConfig",
    "Sequence",
    "load_model",
]
