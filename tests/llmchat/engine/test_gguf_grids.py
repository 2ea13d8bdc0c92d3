"""A GGUF's quantized weights read from its blocks: every type's levels reproduce gguf's own dequantization, a
weight is found by transformers' name (rows reordered where transformers reorders them), and the kernel
multiplies 5-bit levels and scales per 16 as the dense weight would."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf.quants import dequantize, quantize

from llmchat.engine import dot8, int4
from llmchat.engine.gguf_grids import RANGES, GGUFWeights, Q, block_levels
from tests.conftest import rounded_inputs

needs_kernel = pytest.mark.skipif(dot8.unavailable() is not None, reason="llmchat's kernel cannot run here")


def random_blocks(kind, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Blocks of `kind` with random bits and finite float16 scales in the places the type keeps them."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = {Q.Q6_K: (208,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2)}.get(kind, (0,))
    if kind == Q.Q8_0:  # llama.cpp never writes level -128, which the kernel's sign trick could not negate
        data[:, 2:][data[:, 2:] == 128] = 129
    for at in halves:
        scales = (rng.random(len(data)) * 0.01 + 1e-4).astype(np.float16)
        data[:, at : at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("kind", list(RANGES), ids=lambda k: k.name)
def test_every_types_levels_give_back_gguf_values(kind):
    data = random_blocks(kind, 8, 512)
    levels, scales, offsets, values = block_levels(kind, data)
    low, high = RANGES[kind]
    assert low <= levels.min() and levels.max() <= high
    group = 512 // scales.shape[1]
    assert group == (16 if kind == Q.Q6_K else 32)
    rebuilt = levels.float() * scales.repeat_interleave(group, 1)
    if offsets is not None:
        rebuilt += offsets.repeat_interleave(group, 1)
    expected = torch.from_numpy(dequantize(data, kind).reshape(8, 512))
    assert torch.allclose(rebuilt, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_levels_outside_the_types_range_give_no_grid():
    data = random_blocks(Q.Q8_0, 8, 256)
    data[3, 7] = 128  # level -128
    assert block_levels(Q.Q8_0, data) is None


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(2)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_weight_is_found_by_its_transformers_name_and_row_order(tmp_path):
    rng = np.random.default_rng(1)
    q = quantize(rng.standard_normal((64, 128)).astype(np.float32), Q.Q5_0)
    down = random_blocks(Q.Q4_K, 128, 256)
    write_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (q, Q.Q5_0), "blk.1.ffn_down.weight": (down, Q.Q4_K)})
    weights = GGUFWeights(tmp_path / "m.gguf")
    q_values = torch.from_numpy(dequantize(q, Q.Q5_0))
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    levels, scales, offsets = weights.levels("model.layers.0.self_attn.q_proj.weight", q_values[order])
    assert torch.equal(levels, block_levels(Q.Q5_0, q)[0][order])
    rebuilt = levels.float() * scales.repeat_interleave(32, 1) + offsets.repeat_interleave(32, 1)
    assert torch.allclose(rebuilt, q_values[order], rtol=0, atol=1e-6)
    down_values = torch.from_numpy(dequantize(down, Q.Q4_K))
    assert weights.levels("model.layers.1.mlp.down_proj.weight", down_values)[0].max() <= 15
    # Values that are not the file's, a name it does not hold, or another shape: no grid.
    assert weights.levels("model.layers.0.self_attn.q_proj.weight", q_values + 0.01) is None
    assert weights.levels("model.layers.0.self_attn.k_proj.weight", q_values) is None
    assert weights.levels("model.layers.1.mlp.down_proj.weight", down_values[:, :128]) is None


def dense(levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    group = levels.shape[1] // scales.shape[1]
    weight = levels.float() * scales.repeat_interleave(group, 1)
    return weight if offsets is None else weight + offsets.repeat_interleave(group, 1)


@needs_kernel
@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q5_0, Q.Q5_K, Q.Q6_K, Q.Q8_0], ids=lambda k: k.name)
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_the_kernel_multiplies_each_type_as_its_dense_weight(kind, rows):
    levels, scales, offsets, values = block_levels(kind, random_blocks(kind, 48, 512, seed=rows))
    packed = int4.pack(levels, scales, offsets)
    grid = int4.Grid(*packed)
    assert grid.kernel == int4.DOT8_KERNEL
    # One byte a level, in tiles of 8 outputs; an offset of whole steps (Q5_0's) is taken into the levels. Levels in
    # -32..31 lie in quads of inputs as unsigned bytes (8-bit inputs), Q8_0's in pairs as signed ones (16-bit inputs).
    tiles, _, wide_offsets = grid.tensors
    if kind == Q.Q8_0:
        assert tiles.dtype == torch.int8 and tiles.shape == (48 // 8, 512 // 32, 16, 8, 2)
    else:
        assert tiles.dtype == torch.uint8 and tiles.shape == (48 // 8, 512 // 32, 8, 8, 4)
    assert (wide_offsets is None) == (kind in (Q.Q5_0, Q.Q6_K, Q.Q8_0))
    # Packed again exactly, for torch's kernel to be timed against (5-bit levels keep their fifth bits apart).
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(grid.dot8_levels, packed, strict=True))
    assert (packed[3] is not None) == (RANGES[kind] == (0, 31))
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    for byte_inputs in (kind != Q.Q8_0, False):
        grid.round_inputs_to_bytes(byte_inputs)
        assert grid.byte_inputs == byte_inputs
        # The weight as the kernel holds it is the GGUF's, and it multiplies the inputs as rounded to 8 or about 16
        # bits (offsets: the exact inputs).
        held, held_scales, held_offsets = dot8.untiled(*grid.tensors, 48)
        assert torch.allclose(dense(held, held_scales, held_offsets), values, rtol=0, atol=1e-6)
        expected = rounded_inputs(x, byte_inputs) @ dense(held, held_scales, None).t()
        if held_offsets is not None:
            expected += x @ held_offsets.repeat_interleave(32, 1).t()
        assert (grid.matmul(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_fused_projections_of_different_types_meet_as_signed_levels():
    q = block_levels(Q.Q5_0, random_blocks(Q.Q5_0, 16, 256))[:3]
    v = block_levels(Q.Q8_0, random_blocks(Q.Q8_0, 8, 256, seed=1))[:3]
    down = block_levels(Q.Q6_K, random_blocks(Q.Q6_K, 8, 256, seed=2))[:3]
    fused = int4.fused_levels([q, v])
    assert fused[0].dtype == torch.int8 and fused[2] is None
    assert torch.equal(dense(fused[0], fused[1], None), torch.cat([dense(*q), dense(*v)]))
    with_halves = int4.fused_levels([q, down])  # scales per 32 repeated to Q6_K's per 16
    assert with_halves[1].shape == (24, 16)
    assert torch.equal(dense(with_halves[0], with_halves[1], None), torch.cat([dense(*q), dense(*down)]))
    # An offset that is not a whole number of steps (Q4_K's minimums) cannot become signed: no grid.
    k_quant = block_levels(Q.Q4_K, random_blocks(Q.Q4_K, 8, 256))[:3]
    assert int4.fused_levels([k_quant, v]) is None
    assert int4.fused_levels([q, None]) is None


def test_torch_takes_only_what_its_kernel_can_multiply():
    five_bit = int4.pack(*block_levels(Q.Q5_K, random_blocks(Q.Q5_K, 8, 256))[:3])
    per_16 = int4.pack(*block_levels(Q.Q6_K, random_blocks(Q.Q6_K, 8, 256))[:3])
    four_bit = int4.pack(*block_levels(Q.Q4_K, random_blocks(Q.Q4_K, 16, 256))[:3])
    assert not int4.torch_takes(five_bit) and not int4.torch_takes(per_16) and int4.torch_takes(four_bit)
    assert not int4.torch_takes(tuple(t[:8] for t in four_bit[:3]) + (None,))  # its packing takes rows in 16s
    with pytest.raises(ValueError):
        int4.Grid(*five_bit, dot8_kernel=False)
    grid = int4.Grid(*four_bit, dot8_kernel=False)
    x = torch.randn(2, 256)
    expected = x @ _unpacked(four_bit).t()
    assert (grid.matmul(x) - expected).abs().max() <= 0.02 * expected.abs().max()


def test_without_llmchats_kernel_five_bit_weights_stay_dense(monkeypatch):
    monkeypatch.setattr(int4.dot8, "unavailable", lambda: "the CPU lacks AVX2")
    five_bit = int4.pack(*block_levels(Q.Q5_0, random_blocks(Q.Q5_0, 8, 256))[:3])
    assert int4.make_grid(five_bit) is None
    eight_bit = int4.pack(*block_levels(Q.Q8_0, random_blocks(Q.Q8_0, 16, 256))[:3])
    assert int4.make_grid(eight_bit).kernel == int4.TORCH_KERNEL


def _unpacked(levels: int4.Levels) -> torch.Tensor:
    nibbles, scales, offsets, _ = levels
    groups = nibbles.view(nibbles.shape[0], -1, 16)
    values = torch.cat([groups & 15, groups >> 4], dim=-1).flatten(1)
    return dense(values, scales, offsets)
