"""bitsandbytes' 4- and 8-bit layers inside the fused pass: which layers they are, and how they run there."""

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# bitsandbytes' layers, by class name (bitsandbytes is an optional extra), and what /health calls them.
QUANTIZED = {"Linear4bit": "bitsandbytes 4-bit", "Linear8bitLt": "bitsandbytes 8-bit"}


def projection_kind(module: torch.nn.Module) -> str | None:
    """ "dense" for torch's Linear, QUANTIZED's name for a bitsandbytes layer, None for anything else."""
    if type(module) is torch.nn.Linear:
        return "dense"
    names = [cls.__name__ for cls in type(module).__mro__ if cls.__module__.startswith("bitsandbytes")]
    return next((QUANTIZED[name] for name in names if name in QUANTIZED), None)


def dequantized(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit layer's weight [out, in] in `dtype`: the values its own matmul computes with."""
    import bitsandbytes.functional

    weight: Any = module.weight  # bitsandbytes' Params4bit: the packed data and its quant_state
    return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def dequantize_on_cpu(model: "PreTrainedModel", projections: list[list[torch.nn.Linear]]) -> tuple[bool, str]:
    """Whether the fused pass keeps a CPU model's bitsandbytes 4-bit weights dequantized, and why.

    bitsandbytes' CPU matmul (without AVX512_BF16) dequantizes a 4-bit weight on every call: a decode
    step of the bundled model took 151 ms in nf4 against 67 ms in float32. A copy made once, where it
    takes at most half the available memory, computes with the same values at the dense speed.
    """
    # bitsandbytes' Linear4bit, whose weight (a Params4bit) holds its quant_state
    layers: list[Any] = [m for p in projections for m in p if projection_kind(m) == QUANTIZED["Linear4bit"]]
    if model.device.type != "cpu" or not layers:
        return False, ""
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        return False, "kept in 4 bits: bitsandbytes repacked them for its AVX512_BF16 kernel"
    import psutil

    need = sum(m.out_features * m.in_features for m in layers) * model.dtype.itemsize
    dtype = str(model.dtype).removeprefix("torch.")
    if need > psutil.virtual_memory().available // 2:
        return False, f"kept in 4 bits: a {dtype} copy ({need / 2**30:.1f} GiB) would take over half the free memory"
    return True, f"dequantized once to {dtype} (bitsandbytes' CPU matmul dequantizes every call)"


class Modules:
    """Quantized projections (bitsandbytes), each run by its own module and kernel, their outputs side by side.

    On a GPU the fused pass around them (and CUDA graphs, for 4-bit) removes the launches between matmuls.
    On the CPU the quantized matmuls themselves dominate a step: with the rest fused, the bundled model's
    8-bit step was 0.97x to 1.18x as fast as through transformers' forward (1 to 16 rows, AVX2).
    """

    int4, int4_rows, packed, extra_bytes = None, 0, False, 0

    def __init__(self, modules: list[torch.nn.Linear]) -> None:
        self.modules = modules
        self.out_features = sum(m.out_features for m in modules)
        self.in_features = modules[0].in_features

    def __call__(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)
