"""4-bit copies of weights on a 4-bit grid: only where the grid is, with the same values, kept beside the checkpoint."""

import pytest
import torch
from safetensors.torch import save_file

from llmchat.engine import int4
from llmchat.engine.fused_forward import FusedForward, uses_packed_bf16
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.engine.runner import new_cache
from llmchat.settings import Settings


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


def test_weights_off_a_grid_get_no_copy():
    assert int4.to_int4(torch.randn(64, 128)) is None  # a float checkpoint's weights
    assert int4.to_int4(q4_1_like(64, 96)[:, :80]) is None  # rows that are not whole groups
    nudged = q4_1_like(64, 128)
    nudged[3, 7] += 1e-4
    assert int4.to_int4(nudged) is None


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


def teacher_forced(forward, model, tokenizer) -> torch.Tensor:
    """Logits of each step of a fixed answer to a fixed question, [steps, vocab] in float32."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    answer = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    mask, cache = torch.ones_like(ids), new_cache(model)
    with torch.inference_mode():
        forward(ids, mask, torch.arange(ids.shape[1])[None], cache)
        steps = []
        for i, token in enumerate(answer):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            steps.append(forward(torch.tensor([[token]]), mask, torch.tensor([[ids.shape[1] + i]]), cache).float())
    return torch.cat(steps)


def test_bundled_gguf_decodes_few_rows_in_four_bits_as_closely_as_bfloat16():
    bf16, f32 = load("bfloat16"), load("float32")
    if not uses_packed_bf16(bf16.model):
        pytest.skip("the 4-bit path rides on the prepacked bfloat16 one, which needs AMX")
    four_bit = FusedForward(bf16.model, checkpoint=bf16.checkpoint)
    # Every layer's matmuls are Q4_1 in the bundled GGUF; its tied embedding (the logits matmul) is not.
    assert four_bit.kind == f"fused, prepacked bfloat16, 4-bit weights up to {int4.MAX_ROWS} rows (120 of 121 matmuls)"
    plain_pass = FusedForward(bf16.model)
    assert four_bit.extra_bytes > plain_pass.extra_bytes  # /health counts the 4-bit copies too
    exact = teacher_forced(FusedForward(f32.model), f32.model, f32.tokenizer)
    ours = teacher_forced(four_bit, bf16.model, bf16.tokenizer)
    plain = teacher_forced(plain_pass, bf16.model, bf16.tokenizer)
    assert torch.equal(ours.argmax(-1), exact.argmax(-1))
    # The 4-bit weights are the GGUF's own; both paths round to bfloat16 on the way, by about as much.
    assert (ours - exact).abs().max() <= 1.5 * (plain - exact).abs().max()
