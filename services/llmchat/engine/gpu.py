"""Choices made for a GPU: the 16-bit dtype it computes natively, whether to quantize given its free memory,
and what /health says of it. ROCm builds of torch present AMD GPUs through the same cuda API."""

import torch

# Unquantized 16-bit weights may take up to this share of the GPU's free memory; the rest is for the KV
# cache, the prefix cache and activations. Above it, nf4 (a quarter of the bytes) makes the model fit.
UNQUANTIZED_SHARE = 0.5


def native_dtype() -> torch.dtype:
    """bfloat16 where the GPU computes it natively (NVIDIA compute capability 8.0 and later, AMD CDNA2/RDNA3
    and later as torch reports them), else float16: elsewhere bfloat16 matmuls are emulated, several times
    slower."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def on_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list (nested or not) as a tensor on `device`, queued without waiting for the device.

    torch.tensor(values, device="cuda") copies from pageable memory and then synchronizes the stream, so the
    CPU waits for every kernel already queued (a sampling step stalled on the forward pass before it).
    An asynchronous copy from pageable memory stages the bytes before it returns: the source may go at once.
    """
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def skip_cudnn_attention() -> None:
    """Leaves SDPA to the flash and memory-efficient kernels (process-wide). Measured on an H200 with torch 2.11:
    SDPA picked cuDNN's kernel, whose every call spent about 1.2 ms of CPU building or looking up a plan for
    its shape, and a decode step's key length changes every step: 38 ms a step where the other kernels
    give 3 ms."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def choose_quantization(weight_bytes: int, free_bytes: int) -> tuple[str, str]:
    """nf4 or none for quantization=auto on a GPU, and why: 16-bit weights that fit comfortably run
    unquantized (the fused forward pass and CUDA graphs, faster than nf4 through transformers' forward)."""
    need, free = _gib(weight_bytes), _gib(free_bytes)
    if weight_bytes <= UNQUANTIZED_SHARE * free_bytes:
        return "none", f"its 16-bit weights ({need}) fit in half the GPU's free memory ({free})"
    return "nf4", f"its 16-bit weights ({need}) need more than half the GPU's free memory ({free})"


def weight_bytes(path: str, trust_remote_code: bool) -> int:
    """The model's parameters in 16 bits, counted from its config on the meta device (nothing is loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    count = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    # Built from a config the head is its own tensor; loaded, a tied one is the input embedding's.
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and head is not None:
        if head.weight is not model.get_input_embeddings().weight:
            count -= head.weight.numel()
    return 2 * count


def free_bytes(device: int | None = None) -> int:
    return torch.cuda.mem_get_info(device)[0]


def gpu_state(device: torch.device) -> dict:
    """The GPU's name (and whether CUDA or ROCm drives it) and its memory: what torch has allocated and
    reserved there, and the card's total."""
    backend = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    return {
        "name": f"{torch.cuda.get_device_name(device)} ({backend})",
        "index": device.index if device.index is not None else torch.cuda.current_device(),
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "reserved_bytes": torch.cuda.memory_reserved(device),
        "total_bytes": torch.cuda.get_device_properties(device).total_memory,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA or HIP error that leaves the device context unusable (a device-side assert, an illegal memory
    access); out of memory is not one."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, torch.AcceleratorError) or any(m in str(exc) for m in ("CUDA error", "HIP error"))
