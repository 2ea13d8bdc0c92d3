"""4-bit copies of weights on a 4-bit or 8-bit grid: only where the grid is, with the same values, kept beside the
checkpoint, and used up to the row count where they stop being faster."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmchat.engine import dot8, fused_forward, input_rounding, int4, projections
from llmchat.engine.choices import Choices
from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.settings import Settings
from tests.conftest import rounded_inputs, teacher_forced


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
    levels = int4.q4_1_levels(weight)
    assert levels is not None and levels[0].dtype == torch.uint8 and levels[0].shape == (96, 64)
    x = torch.randn(3, 128).bfloat16()
    # torch's kernel rounds its scales and offsets to bfloat16, as bfloat16 weights would be.
    expected = x.float() @ weight.t()
    grid = int4.Grid(*levels, dot8_kernel=False)
    assert grid.kernel == int4.TORCH_KERNEL and grid.tensors[1].dtype == torch.bfloat16  # its copy alone is kept
    got = grid.matmul(x).float()
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()


def q8_0_like(out_features: int, in_features: int) -> torch.Tensor:
    """What a Q8_0 GGUF dequantizes to: per group of 32, scale * level with levels -127..127, 127 in magnitude used."""
    torch.manual_seed(1)
    groups = in_features // int4.GROUP
    levels = torch.randint(-127, 128, (out_features, groups, int4.GROUP))
    levels[..., 0] = 127 * (torch.randint(0, 2, (out_features, groups)) * 2 - 1)
    scale = (torch.rand(out_features, groups, 1) * 1e-3 + 1e-4).half().float()  # GGUF keeps it in float16
    return (levels * scale).view(out_features, in_features)


def test_eight_bit_weights_keep_their_values():
    weight = q8_0_like(80, 128)
    weight[2, 32:64] = 0.0  # an all-zero group: scale 0
    assert int4.q4_1_levels(weight) is None  # more than 16 levels a group
    levels, scales, offsets, _ = int4.grid_levels(weight)
    assert levels.dtype == torch.int8 and offsets is None
    assert torch.equal(levels.float() * scales.repeat_interleave(int4.GROUP, dim=1), weight)
    x = torch.randn(5, 128)
    expected = x.bfloat16().float() @ weight.t()
    got = int4.Grid(levels, scales, offsets, dot8_kernel=False).matmul(x)  # two 4-bit grids over the input twice
    assert got.dtype == torch.float32  # in the input's dtype, computed in bfloat16
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()


@pytest.mark.skipif(dot8.unavailable() is not None, reason=f"llmchat's kernel cannot run here: {dot8.unavailable()}")
@pytest.mark.parametrize("byte_inputs", [True, False], ids=["8-bit inputs", "16-bit inputs"])
def test_the_dot8_kernel_is_exact_but_for_rounding_its_inputs(byte_inputs):
    # 20 outputs: the kernel's tiles of 8 are padded, and the padding's outputs not returned.
    q4_1, q8_0, odd = q4_1_like(96, 128), q8_0_like(80, 128), q4_1_like(20, 128)
    q4_1[5, :32] = 0.25  # a flat group: scale 0
    q8_0[2, 32:64] = 0.0  # an all-zero group: scale 0
    for weight in (q4_1, q8_0, odd):
        grid = int4.Grid(*int4.grid_levels(weight))
        assert grid.kernel == int4.DOT8_KERNEL
        # Levels in -32..31 take 8-bit inputs unless laid out again; Q8_0's always take 16-bit ones.
        assert grid.byte_inputs == (weight is not q8_0)
        grid.round_inputs_to_bytes(byte_inputs)
        assert grid.byte_inputs == (byte_inputs and weight is not q8_0)
        offsets = grid.dot8_levels[2]
        offsets = torch.zeros_like(weight) if offsets is None else offsets.repeat_interleave(int4.GROUP, 1)
        for rows in (1, 2, 3, 4, 6, 7, 9):  # the kernel takes rows four at a time, then the last 3 or 2, or 1
            x = torch.randn(rows, 128)
            x[0, 64:96] = 0.0  # an all-zero input group
            # The offsets multiply the exact inputs: a group's sum is taken before rounding.
            expected = rounded_inputs(x, grid.byte_inputs) @ (weight - offsets).t() + x @ offsets.t()
            got = grid.matmul(x)
            assert got.shape == (rows, weight.shape[0])
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
            assert grid.matmul(x.bfloat16()).dtype == torch.bfloat16
            # A row's result is the same beside any rows: a prompt's keys do not depend on how it was chunked.
            assert all(torch.equal(grid.matmul(x[i : i + 1]), got[i : i + 1]) for i in range(rows))
            # The first 16 outputs alone, for timing part of a large weight, sharing its tensors.
            head = grid.head(16)
            assert torch.equal(head.matmul(x), got[:, :16]) and head.tensors[0].data_ptr() == grid.tensors[0].data_ptr()
        assert all(
            a is b is None or torch.equal(a, b[:16])
            for a, b in zip(grid.head(16).dot8_levels, grid.dot8_levels, strict=True)
        )


def test_the_kernel_in_use_is_named():
    levels = int4.grid_levels(q4_1_like(32, 64))
    expected = int4.DOT8_KERNEL if dot8.unavailable() is None else int4.TORCH_KERNEL
    assert int4.Grid(*levels).kernel == expected
    assert int4.Grid(*levels, dot8_kernel=False).kernel == int4.TORCH_KERNEL


def test_weights_off_a_grid_get_no_copy():
    for make in (int4.q4_1_levels, int4.q8_0_levels, int4.grid_levels):
        assert make(torch.randn(64, 128)) is None  # a float checkpoint's weights
    assert int4.q4_1_levels(q4_1_like(64, 96)[:, :80]) is None  # rows that are not whole groups
    assert int4.q8_0_levels(q8_0_like(64, 96)[:, :80]) is None
    nudged = q4_1_like(64, 128)
    nudged[3, 7] += 1e-4
    assert int4.q4_1_levels(nudged) is None
    nudged = q8_0_like(64, 128)
    nudged[3, 7] *= 1.001
    assert int4.q8_0_levels(nudged) is None


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
    # A GGUF that cannot be read leaves the grids its values show.
    assert [g is not None for g in int4.load_grids(tmp_path, projections, gguf=tmp_path / "gone.gguf")] == [
        True,
        False,
        False,
    ]
    assert (tmp_path / int4.CACHE_FILE).is_file()
    (tmp_path / "model.safetensors").unlink()  # a second start reads the kept copy alone
    again = int4.load_grids(tmp_path, projections)
    assert [g is not None for g in again] == [True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(first[0].tensors, again[0].tensors, strict=True))


def load(dtype: str):
    return load_model(ModelConfig("bundled", device="cpu", dtype=dtype, cache_dir=Settings().cache_dir))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bundled_gguf_decodes_few_rows_in_four_bits_as_closely_as_bfloat16(dtype):
    served, f32 = load(dtype), load("float32")
    four_bit = FusedForward(served.model, checkpoint=served.checkpoint, int4_rows=4, gguf=served.gguf)
    # Every layer's matmuls are Q4_1 in the bundled GGUF, its tied embedding (the logits matmul) Q8_0; the levels
    # are read from its blocks, as the engine does.
    assert ", 4-bit weights up to 4 rows (121 of 121 matmuls, " in four_bit.kind
    plain_pass = FusedForward(served.model)
    assert four_bit.extra_bytes > plain_pass.extra_bytes  # /health counts the 4-bit copies too
    exact = teacher_forced(FusedForward(f32.model), f32.model, f32.tokenizer)
    ours = teacher_forced(four_bit, served.model, served.tokenizer)
    rounded = teacher_forced(FusedForward(load("bfloat16").model), served.model, served.tokenizer)
    assert torch.equal(ours.argmax(-1), exact.argmax(-1))
    # The 4-bit weights are the GGUF's own. llmchat's kernel rounds its inputs to about 16 bits, so a float32
    # model's logits stay far closer to the float32 weights' than bfloat16 weights' do (measured: 0.007 against
    # 0.59); torch's kernel rounds them to bfloat16, about as far (0.32). In a bfloat16 model its own rounding
    # decides (measured: 0.89 with llmchat's kernel, 0.65 with torch's, though per matmul ours is the closer).
    # Those were on AVX2; on AMX (oneDNN's bfloat16 kernels round differently) the four distances came to 0.011,
    # 0.45, 0.90 and 1.06 of bfloat16's: the bounds hold on both.
    dot8_kernel = int4.DOT8_KERNEL in four_bit.kind
    bound = 2.0 if dtype == "bfloat16" else 0.1 if dot8_kernel else 1.5
    assert (ours - exact).abs().max() <= bound * (rounded - exact).abs().max()


def test_four_bit_weights_serve_only_up_to_their_row_count_and_not_at_all_when_off():
    loaded = load("float32")
    off = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=0, packed=False)
    assert off.kind == "fused" and off.extra_bytes == 0
    four_bit = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=2, packed=False)
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
    assert set(rows) <= {0, *int4.CANDIDATE_ROWS, projections.ALL_ROWS}
    assert measured.lm_head.int4_rows != projections.ALL_ROWS  # never timed at a prompt's rows
    if any(rows):
        assert "4-bit weights up to " in measured.kind or "4-bit weights in every step" in measured.kind
    else:  # slower at every row count on this machine: the copies are not kept
        assert all(p.int4 is None for p in (*vars(measured.layers[0]).values(), measured.lm_head) if hasattr(p, "int4"))


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
    monkeypatch.setattr(int4, "torch_kernel_is_faster", lambda grids, width, dtype: False)
    monkeypatch.setattr(projections, "_measured", Choices())
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
    assert ", 4-bit weights up to q/k/v 16, gate/up 16, down 16, logits 4 rows (91 of 121 matmuls, " in measured.kind


def test_a_kind_of_projection_that_wins_at_a_prompts_rows_takes_four_bits_in_every_step(monkeypatch):
    """With timings where the 4-bit matmuls win at every row count for gate/up and the logits, and for the output
    projection at every count but a prompt chunk's 512 rows."""
    loaded = load("float32")
    config = loaded.model.config

    def timer(pairs, width, dtype):
        out_features = pairs[0][0].__self__.out_features
        loses_at = 512 if out_features == config.hidden_size and width == config.hidden_size else None
        return lambda rows: (1.0, 2.0 if rows == loses_at else 0.5)

    monkeypatch.setattr(int4, "timer", timer)
    monkeypatch.setattr(int4, "torch_kernel_is_faster", lambda grids, width, dtype: False)
    monkeypatch.setattr(projections, "_measured", Choices())
    monkeypatch.setattr(fused_forward, "pick_packing", lambda *args: (128, "prepacked up to 128 rows"))
    measured = FusedForward(loaded.model, checkpoint=loaded.checkpoint, max_rows=64)
    layer, every = measured.layers[0], projections.ALL_ROWS
    assert (layer.qkv.int4_rows, layer.o.int4_rows, layer.gate_up.int4_rows, layer.down.int4_rows) == (
        every,
        64,
        every,
        every,
    )
    assert measured.lm_head.int4_rows == 64  # the logits are never a prompt's rows: not timed at 512
    # No step has more than max_rows sequences: the logits' prepacked copy goes, a larger step takes the plain weight.
    head = measured.lm_head
    assert head.packed_weight is None and head.weight is not None
    rows = torch.randn(65, config.hidden_size)
    assert torch.equal(head(rows), torch.nn.functional.linear(rows, head.weight, head.bias))
    # A dense matmul that no longer runs keeps no copy, prepacked or fused: the model's own projections keep theirs.
    assert layer.gate_up.packed_weight is None and layer.gate_up.weight is None and layer.o.packed
    mlp = loaded.model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (config.intermediate_size, config.hidden_size)
    assert ", 4-bit weights in every step for q/k/v, gate/up, down, up to 64 rows for o, logits (" in measured.kind
    # A prompt's rows take one kernel whatever their number: the 4-bit one in every step, else the dense one.
    calls = []
    for linear in (layer.gate_up, layer.o):
        quantized = linear.quantized
        linear.quantized = lambda flat, quantized=quantized, name=linear.out_features: (
            calls.append((name, flat.shape[0])) or quantized(flat)
        )
    layer.gate_up(torch.randn(1, 3, config.hidden_size), prefill=True)
    layer.o(torch.randn(1, 3, config.hidden_size), prefill=True)
    layer.o(torch.randn(1, 3, config.hidden_size))  # three decode rows
    assert calls == [(2 * config.intermediate_size, 3), (config.hidden_size, 3)]


@pytest.mark.skipif(dot8.unavailable() is not None, reason=f"llmchat's kernel cannot run here: {dot8.unavailable()}")
def test_a_kind_of_projection_moves_to_torchs_kernel_where_that_is_faster(monkeypatch):
    loaded = load("float32")
    widths = []

    def torch_faster(grids, width, dtype):  # only for the down projection, the one whose input is the MLP's width
        widths.append(width)
        return width == loaded.model.config.intermediate_size

    monkeypatch.setattr(int4, "torch_kernel_is_faster", torch_faster)
    # The 4-bit weights win at every row count: whether they beat the dense matmuls on this CPU is another test's.
    monkeypatch.setattr(int4, "timer", lambda pairs, width, dtype: lambda rows: (1.0, 0.5))
    monkeypatch.setattr(projections, "_measured", Choices())
    measured = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=None)
    assert len(widths) == 5  # timed once per kind of projection
    kernels = {(name, getattr(layer, name).int4.kernel) for layer in measured.layers for name in ("qkv", "down")}
    assert kernels == {("qkv", int4.DOT8_KERNEL), ("down", int4.TORCH_KERNEL)}
    assert f"{int4.DOT8_KERNEL} of 16-bit inputs, {int4.TORCH_KERNEL})" in measured.kind


def test_a_kernel_that_cannot_be_built_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    why = dot8.unavailable.__wrapped__()  # uncached: this process may have built the real one
    if torch.cpu.get_capabilities().get("avx2"):
        assert why == "kernel build failed: false failed: exit status 1"
    assert why is not None and not list(tmp_path.glob("llmchat/*.so"))


@pytest.mark.parametrize(
    ("machine", "avx2", "compiler", "expected"),
    [
        ("aarch64", True, "/usr/bin/c++", "not an x86 CPU (aarch64)"),
        ("x86_64", False, "/usr/bin/c++", "the CPU lacks AVX2"),
        ("x86_64", True, None, "no C++ compiler (c++ or g++) on PATH"),
    ],
    ids=["arm", "no avx2", "no compiler"],
)
def test_the_kernel_is_not_built_where_it_cannot_run(monkeypatch, machine, avx2, compiler, expected):
    """Every reason llmchat's kernel may not run, on any host (faked CPU and PATH); nothing is compiled."""
    monkeypatch.setattr(dot8.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": avx2})
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(dot8.shutil, "which", lambda name: compiler)
    monkeypatch.setattr(dot8, "_built", lambda compiler: pytest.fail("compiled"))
    assert dot8.unavailable.__wrapped__() == expected


def test_without_the_kernel_torchs_serves_and_health_says_why(monkeypatch):
    monkeypatch.setattr(dot8, "unavailable", lambda: "no C++ compiler (c++ or g++) on PATH")
    loaded = load("float32")
    four_bit = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=4)
    assert four_bit.kind.endswith("(121 of 121 matmuls, torch's int4 kernel: no C++ compiler (c++ or g++) on PATH)")
    x = torch.randn(2, loaded.model.config.hidden_size)
    assert torch.allclose(four_bit.lm_head(x), FusedForward(loaded.model).lm_head(x), atol=0.1)


@pytest.mark.skipif(dot8.unavailable() is not None, reason=f"llmchat's kernel cannot run here: {dot8.unavailable()}")
def test_the_kernel_shares_torchs_openmp_threads():
    """A second OpenMP runtime would bring a second pool of threads onto the same cores: parallel ops were
    measured several times slower beside one. The kernel links libgomp.so.1, the name torch's wheels load."""
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(mapped) == 1, mapped


def test_llmchats_kernel_takes_a_byte_a_level_signed_where_the_offset_is_whole_steps():
    levels, scales = torch.randint(0, 32, (16, 64)), torch.rand(16, 2) + 0.1
    # Q5_0: 16 steps below zero, so the levels become signed and the offsets go.
    (wide, _, offsets), shift = int4.widened(int4.pack(levels, scales, -16 * scales))
    assert offsets is None and torch.equal(wide, (levels - 16).to(torch.int8))
    assert torch.equal(shift, torch.full((16, 2), 16, dtype=torch.int8))
    # 200 steps below zero: signed, the levels would not fit a byte, so they keep their offsets.
    (wide, _, offsets), shift = int4.widened(int4.pack(levels, scales, -200 * scales))
    assert shift is None and torch.equal(wide, levels.to(torch.int8)) and torch.equal(offsets, -200 * scales)


@pytest.mark.skipif(dot8.unavailable() is not None, reason=f"llmchat's kernel cannot run here: {dot8.unavailable()}")
def test_one_row_reads_four_and_five_bit_levels_in_five_bits_with_the_same_result():
    gen = torch.Generator().manual_seed(3)
    scales = torch.rand(24, 4, generator=gen) + 0.1
    five_bits, four_bits = (
        torch.randint(0, 32, (24, 128), generator=gen),
        torch.randint(0, 16, (24, 128), generator=gen),
    )
    q5_0 = int4.pack(five_bits, scales, -16 * scales)  # signed -16..15
    q5_k = int4.pack(five_bits, scales, 0.3 * scales)  # unsigned 0..31, offsets kept
    q4_k = int4.pack(four_bits, scales, 0.3 * scales)
    q6_k = (torch.randint(-32, 32, (24, 128), generator=gen, dtype=torch.int8), torch.rand(24, 8) + 0.1, None, None)
    x = torch.randn(6, 128, generator=gen)
    for levels, base in ((q5_0, 16), (q5_k, 32), (q4_k, 16)):
        grid = int4.Grid(*levels)
        assert grid.fives is not None and grid.fives[2] == base
        tiles, tile_scales, tile_offsets = grid.tensors
        assert grid.nbytes == sum(
            t.nbytes for t in (tiles, tile_scales, tile_offsets, *grid.fives[:2]) if t is not None
        )
        rows = grid.matmul(x)  # a block of 4 rows and one of 2, through the byte levels
        for i in range(len(x)):  # one row: the byte levels' result to the bit
            alone = grid.matmul(x[i : i + 1])
            assert torch.equal(alone, dot8.levels_mm(x[i : i + 1], *grid.tensors)[:, :24])
            assert torch.equal(alone, rows[i : i + 1])
        assert torch.equal(grid.head(16).matmul(x[:1]), rows[:1, :16])
        grid.round_inputs_to_bytes(False)  # 16-bit inputs: no quads, no copy
        assert grid.fives is None
    # Levels that need six bits, and Q8_0's, keep their bytes alone.
    assert int4.Grid(*q6_k).fives is None
    assert int4.Grid(*int4.grid_levels(q8_0_like(16, 128))).fives is None


@pytest.mark.skipif(dot8.unavailable() is not None, reason=f"llmchat's kernel cannot run here: {dot8.unavailable()}")
def test_the_models_own_logits_decide_whether_inputs_are_rounded_to_8_bits(monkeypatch):
    loaded = load("float32")
    divergence = input_rounding.divergence_of_byte_inputs
    built = fused_forward._projections
    projs = [*(p for layer in loaded.model.model.layers for p in built(layer)), [loaded.model.lm_head]]
    grids = projections.checkpoint_grids(loaded.model, projs, loaded.checkpoint, loaded.gguf)
    # The bundled SmolLM2's huge activations: its layers' Q4_1 weights would take 8-bit inputs, its logits would move.
    assert sum(g.byte_inputs for g in grids) == 120 and not grids[-1].byte_inputs  # the Q8_0 logits matmul
    assert input_rounding.divergence_of_byte_inputs(loaded.model, projs, grids) > input_rounding.MAX_KL
    monkeypatch.setattr(projections, "_measured", Choices())
    kept = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=4, gguf=loaded.gguf)
    assert "8-bit dot products of 16-bit inputs)" in kept.kind
    assert not any(p.int4.byte_inputs for layer in kept.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
    # Where rounding the inputs costs the logits nothing measurable, the grids keep 8-bit inputs.
    monkeypatch.setattr(projections, "_measured", Choices())
    monkeypatch.setattr(input_rounding, "divergence_of_byte_inputs", lambda *args: 1e-5)
    rounded = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=4, gguf=loaded.gguf)
    assert "8-bit dot products of 8- and 16-bit inputs)" in rounded.kind  # the Q8_0 logits matmul's 16
    assert all(p.int4.byte_inputs for layer in rounded.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
    # A model the check cannot run through still loads, on 16-bit inputs, and nothing is kept of it.
    monkeypatch.setattr(projections, "_measured", Choices())
    monkeypatch.setattr(input_rounding, "divergence_of_byte_inputs", lambda *args: 1 / 0)
    failed = FusedForward(loaded.model, checkpoint=loaded.checkpoint, int4_rows=4, gguf=loaded.gguf)
    assert "8-bit dot products of 16-bit inputs)" in failed.kind
    assert not [key for key in projections._measured.values if key.startswith("8-bit inputs")]
    # The divergence compares the two roundings and nothing else: with the layout left alone it is none at all.
    for grid in grids[:-1]:  # the check left them on 16-bit inputs
        grid.round_inputs_to_bytes(True)
    assert sum(g.byte_inputs for g in grids) == 120
    monkeypatch.setattr(int4.Grid, "round_inputs_to_bytes", lambda grid, on: None)
    assert divergence(loaded.model, projs, grids) == 0.0
