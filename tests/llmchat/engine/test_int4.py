"""4-bit copies of weights on a 4-bit or 8-bit grid: only where the grid is, with the same values, kept beside the
checkpoint, and used up to the row count where they stop being faster."""

import pytest
import torch
from safetensors.torch import save_file

from llmchat.engine import fused_forward, int4
from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.settings import Settings
from tests.conftest import teacher_forced


def q4_1_like(out_features: int, in_features: int) -> torch.Tensor:
    """What a Q4_1 GGUF dequantizes to: per group of 32, scale * level + offset with levels 0..15 and both ends used."""
    torch.manual_seed(0)
    groups = in_features // int4.GROUP
    levels = torch.randint(0, 16, (out_features, groups, int4.GROUP))
    levels[..., 0], levels[..., 1] = 0, 15
    scale = torch.rand(out_features, groups, 1) * 0.02 + 1e-3
    offset = torch.randn(out_features, groups, 1) * 0.1
    return (levels * scale + offset).view(out_features, in_features)


def test_weights_on_a_grid_keep_their_values_in_four_bits():
    weight = q4_1_like(96, 128)
    weight[5, :32] = 0.25  # a flat group: scale 0
    grid = int4.to_int4(weight)
    assert grid is not None
    x = torch.randn(3, 128).bfloat16()
    # The kernel's scales and offsets are rounded to bfloat16, as bfloat16 weights would be.
    expected = x.float() @ weight.t()
    got = int4.matmul(x, grid).float()
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()


def q8_0_like(out_features: int, in_features: int) -> torch.Tensor:
    """What a Q8_0 GGUF dequantizes to: per group of 32, scale * level with levels -127..127, 127 in magnitude used."""
    torch.manual_seed(1)
    groups = in_features // int4.GROUP
    levels = torch.randint(-127, 128, (out_features, groups, int4.GROUP))
    levels[..., 0] = 127 * (torch.randint(0, 2, (out_features, groups)) * 2 - 1)
    scale = (torch.rand(out_features, groups, 1) * 1e-3 + 1e-4).half().float()  # GGUF keeps it in float16
    return (levels * scale).view(out_features, in_features)


def test_eight_bit_weights_split_into_two_four_bit_grids_with_the_same_values():
    weight = q8_0_like(80, 128)
    weight[2, 32:64] = 0.0  # an all-zero group: scale 0
    assert int4.to_int4(weight) is None  # more than 16 levels a group
    grid = int4.from_grid(weight)
    assert grid is not None and grid[1].shape[0] == 2 * 128 // int4.GROUP  # high and low grids of every group
    x = torch.randn(5, 128)
    expected = x.bfloat16().float() @ weight.t()
    got = int4.matmul(x, grid)
    assert got.dtype == torch.float32  # in the input's dtype, computed in bfloat16
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()


def test_weights_off_a_grid_get_no_copy():
    for make in (int4.to_int4, int4.q8_to_int4, int4.from_grid):
        assert make(torch.randn(64, 128)) is None  # a float checkpoint's weights
    assert int4.to_int4(q4_1_like(64, 96)[:, :80]) is None  # rows that are not whole groups
    assert int4.q8_to_int4(q8_0_like(64, 96)[:, :80]) is None
    nudged = q4_1_like(64, 128)
    nudged[3, 7] += 1e-4
    assert int4.to_int4(nudged) is None
    nudged = q8_0_like(64, 128)
    nudged[3, 7] *= 1.001
    assert int4.q8_to_int4(nudged) is None


def test_the_crossover_is_the_most_rows_before_the_dense_matmuls_win():
    tried = []

    def seconds_at(rows):  # 4-bit costs grow with rows; the dense matmul costs 20 at any
        tried.append(rows)
        return 20.0, 2.0 * rows

    assert int4.crossover(seconds_at) == 8
    assert tried == [1, 2, 4, 8, 12, 12]  # the loss timed twice, nothing past it

    def disturbed(rows):  # the first timing at 4 rows ran beside other work
        tried.append(rows)
        return (20.0, 50.0) if tried.count(4) == 1 and rows == 4 else (20.0, 2.0 * rows)

    tried.clear()
    assert int4.crossover(disturbed) == 8
    assert int4.crossover(lambda rows: (1.0, 2.0)) == 0  # never faster
    assert int4.crossover(lambda rows: (2.0, 1.0)) == int4.CANDIDATE_ROWS[-1]


def test_grids_are_kept_beside_the_checkpoint(tmp_path):
    save_file(
        {"a.weight": q4_1_like(32, 64), "b.weight": q4_1_like(16, 64), "c.weight": torch.randn(8, 64)},
        tmp_path / "model.safetensors",
    )
    projections = [["a.weight", "b.weight"], ["c.weight"], ["missing.weight"]]
    first = int4.load_grids(tmp_path, projections)
    assert [g is not None for g in first] == [True, False, False]
    assert (tmp_path / int4.CACHE_FILE).is_file()
    (tmp_path / "model.safetensors").unlink()  # a second start reads the kept copy alone
    again = int4.load_grids(tmp_path, projections)
    assert [g is not None for g in again] == [True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0], strict=True))


def load(dtype: str):
    return load_model(ModelConfig("bundled", device="cpu", dtype=dtype, cache_dir=Settings().cache_dir))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bundled_gguf_decodes_few_rows_in_four_bits_as_closely_as_bfloat16(dtype):
    served, f32 = load(dtype), load("float32")
    four_bit = FusedForward(served.model, checkpoint=served.checkpoint, int4_rows=4)
    # Every layer's matmuls are Q4_1 in the bundled GGUF, its tied embedding (the logits matmul) Q8_0.
    assert four_bit.kind.endswith(", 4-bit weights up to 4 rows (121 of 121 matmuls)")
    plain_pass = FusedForward(served.model)
    assert four_bit.extra_bytes > plain_pass.extra_bytes  # /health counts the 4-bit copies too
    exact = teacher_forced(FusedForward(f32.model), f32.model, f32.tokenizer)
    ours = teacher_forced(four_bit, served.model, served.tokenizer)
    rounded = teacher_forced(FusedForward(load("bfloat16").model), served.model, served.tokenizer)
    assert torch.equal(ours.argmax(-1), exact.argmax(-1))
    # The 4-bit weights are the GGUF's own; on the way they round to bfloat16 about as much as bfloat16 does.
    assert (ours - exact).abs().max() <= 1.5 * (rounded - exact).abs().max()


def test_four_bit_weights_serve_only_up_to_their_row_count_and_not_at_all_when_off():
    loaded = load("float32")
    off = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=0)
    assert off.kind == "fused" and off.extra_bytes == 0
    four_bit = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=2)
    calls = []
    quantized = four_bit.lm_head.quantized
    four_bit.lm_head.quantized = lambda flat: calls.append(flat.shape[0]) or quantized(flat)
    for rows in (1, 2, 3):
        x = torch.randn(rows, loaded.model.config.hidden_size)
        assert torch.equal(four_bit.lm_head(x), quantized(x) if rows <= 2 else off.lm_head(x))
    assert calls == [1, 2]


def test_the_measured_crossovers_are_used_and_named():
    loaded = load("float32")
    measured = FusedForward(loaded.model, checkpoint=loaded.checkpoint)
    for name in ("qkv", "o", "gate_up", "down"):  # one crossover per kind of projection, the same in every layer
        assert len({getattr(layer, name).int4_rows for layer in measured.layers}) == 1
    rows = [p.int4_rows for p in (*vars(measured.layers[0]).values(), measured.lm_head) if hasattr(p, "int4_rows")]
    assert set(rows) <= {0, *int4.CANDIDATE_ROWS}
    if any(rows):
        assert "4-bit weights up to " in measured.kind
    else:  # slower at every row count on this machine: the copies are not kept
        assert measured.kind == "fused" and measured.extra_bytes == 0


def test_each_kind_of_projection_gets_its_own_crossover(monkeypatch):
    """With timings where the dense matmul wins beyond 4 rows for the logits, never loses for the output
    projection, and wins beyond 16 rows elsewhere."""
    loaded = load("float32")
    config = loaded.model.config

    def timer(pairs, width, dtype):
        out_features = pairs[0][0].__self__.out_features
        limit = {config.vocab_size: 4, config.hidden_size: 16 if width != config.hidden_size else 0}.get(
            out_features, 16
        )
        return lambda rows: (1.0, 0.5 if rows <= limit else 2.0)

    monkeypatch.setattr(int4, "timer", timer)
    monkeypatch.setattr(fused_forward, "_crossovers", {})
    measured = FusedForward(loaded.model, checkpoint=loaded.checkpoint)
    assert measured.lm_head.int4_rows == 4
    for layer in measured.layers:
        assert (layer.qkv.int4_rows, layer.o.int4_rows, layer.gate_up.int4_rows, layer.down.int4_rows) == (
            16,
            0,
            16,
            16,
        )
        assert layer.o.int4 is None  # never faster: its copy is not kept
    assert measured.kind.endswith(
        ", 4-bit weights up to q/k/v 16, gate/up 16, down 16, logits 4 rows (91 of 121 matmuls)"
    )
