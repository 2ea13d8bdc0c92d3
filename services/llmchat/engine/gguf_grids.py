"""The levels of a GGUF's quantized weights, read from its blocks, for the few-row kernels (int4.py, dot8.py).

Checking float32 weights for a grid only finds one whose groups span it (Q4_1's 0..15, Q8_0's largest magnitude
at 127). The other types, the K-quants most files use among them, store a scale (and an offset) per group that
need not match the group's values: read from the blocks, they give every group's levels exactly.

- Q4_0, Q4_1, Q4_K: 4-bit levels with a scale and an offset per 32 (Q4_K's 6-bit sub-block scales and minimums
  times its super-block's two);
- Q5_0, Q5_1, Q5_K: the same with 5-bit levels;
- Q6_K: signed 6-bit levels with a scale per 16, Q8_0 signed 8-bit ones with a scale per 32.

Each block's scales are read here; the levels come from gguf's own dequantization, divided back by them, and the
whole weight must match the converted checkpoint's (rows reordered, as transformers does for Llama's q and k).
"""

import logging
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    get_tensor_name_map,
)
from gguf.quants import Q4_K, dequantize

log = logging.getLogger("llmchat.gguf_grids")

Q = GGMLQuantizationType
# Per type: the levels' range, and whether the levels sit with an offset (unsigned) or without (signed).
RANGES = {
    Q.Q4_0: (0, 15),
    Q.Q4_1: (0, 15),
    Q.Q4_K: (0, 15),
    Q.Q5_0: (0, 31),
    Q.Q5_1: (0, 31),
    Q.Q5_K: (0, 31),
    Q.Q6_K: (-32, 31),
    Q.Q8_0: (-127, 127),
}


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def scales_and_offsets(kind: GGMLQuantizationType, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per block: each group's scale [blocks, groups] and offset (None for the signed types), as gguf dequantizes:
    a value is level * scale + offset."""
    if kind in (Q.Q4_0, Q.Q5_0):
        d = _half(blocks, 0)
        return d, d * -(RANGES[kind][1] + 1) / 2
    if kind in (Q.Q4_1, Q.Q5_1):
        return _half(blocks, 0), _half(blocks, 2)
    if kind in (Q.Q4_K, Q.Q5_K):
        scale, minimum = Q4_K.get_scale_min(blocks[:, 4 : 4 + Q4_K.K_SCALE_SIZE])
        return _half(blocks, 0) * scale.astype(np.float32), -(_half(blocks, 2) * minimum.astype(np.float32))
    if kind == Q.Q6_K:
        return _half(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32), None
    if kind == Q.Q8_0:
        return _half(blocks, 0), None
    raise ValueError(f"no grid for {kind.name}")


def block_levels(
    kind: GGMLQuantizationType, data: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """A tensor's levels [out, in] (int16), scales [out, groups] and offsets (or None), and its values; None where
    a level falls outside the type's range (a file not written the way its type says)."""
    out = data.shape[0]
    values = dequantize(data, kind).reshape(out, -1)
    blocks = data.reshape(-1, GGML_QUANT_SIZES[kind][1])
    scales, offsets = scales_and_offsets(kind, blocks)
    group = values.shape[1] * out // scales.size
    step = np.repeat(scales.reshape(out, -1), group, axis=1)
    base = np.repeat(offsets.reshape(out, -1), group, axis=1) if offsets is not None else 0.0
    levels = np.rint((values - base) / np.where(step == 0, 1, step))
    low, high = RANGES[kind]
    if levels.min() < low or levels.max() > high:
        return None
    return (
        torch.from_numpy(levels.astype(np.int16)),
        torch.from_numpy(scales.reshape(out, -1).astype(np.float32)),
        torch.from_numpy(offsets.reshape(out, -1).astype(np.float32)) if offsets is not None else None,
        torch.from_numpy(values),
    )


class GGUFWeights:
    """A GGUF file's quantized weights, found by the names transformers gives them."""

    def __init__(self, path: Path) -> None:
        reader = GGUFReader(path)
        arch_name = _field(reader, "general.architecture")
        arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == arch_name), None)
        blocks = _field(reader, f"{arch_name}.block_count")
        self.names = get_tensor_name_map(arch, int(blocks)) if arch is not None and blocks is not None else None
        self.tensors = {t.name: t for t in reader.tensors}

    def levels(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The levels, scales and offsets of the checkpoint's weight `name` (float32 [out, in], as converted), rows
        in its order; None where the file holds it in another type or its values are not the weight's."""
        base = name.removesuffix(".weight")
        gguf_name = self.names.get_name(base) if self.names is not None else None
        tensor = self.tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if tensor is None or tensor.tensor_type not in RANGES:
            return None
        found = block_levels(tensor.tensor_type, np.asarray(tensor.data))
        if found is None:
            return None
        levels, scales, offsets, values = found
        if values.shape != weight.shape:
            return None
        order = _row_order(values, weight)
        if order is None:
            log.info("%s: the GGUF's values are not the converted weight's; no grid for it", name)
            return None
        return levels[order], scales[order], offsets[order] if offsets is not None else None


def _field(reader: GGUFReader, key: str) -> str | int | None:
    """A string or integer of the file's metadata (read by hand: `ReaderField.contents` is newer than gguf 0.10)."""
    field = reader.get_field(key)
    if field is None or not field.types:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == GGUFValueType.STRING else int(value[0])


def _row_order(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The rows of `values` in `weight`'s order (`values[order]` equals it), or None where no order does."""
    close = lambda a: torch.allclose(a, weight, rtol=0, atol=1e-6 * float(weight.abs().amax()))  # noqa: E731
    identity = torch.arange(values.shape[0])
    if close(values):
        return identity
    # Rows reordered (transformers undoes llama.cpp's rotary reordering of q and k): match them by a projection.
    probe = torch.randn(values.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours, theirs = values.double() @ probe, weight.double() @ probe
    order = torch.empty_like(identity)
    order[theirs.argsort()] = ours.argsort()
    return order if close(values[order]) else None
