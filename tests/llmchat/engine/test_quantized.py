"""bitsandbytes models on the fused pass, on the CPU: 4-bit weights dequantized once where memory allows, or left to
bitsandbytes where it repacked them for its AVX512_BF16 kernel, 8-bit layers run as they are; either way the logits
are transformers' own on the same quantized layers."""

import psutil
import pytest
import torch

from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.engine.quantized import Modules
from llmchat.engine.runner import TransformersForward
from llmchat.settings import Settings
from tests.conftest import teacher_forced


def load(quantization: str, dtype: str = "auto"):
    config = ModelConfig(
        "bundled", device="cpu", dtype=dtype, quantization=quantization, cache_dir=Settings().cache_dir
    )
    return load_model(config)


def generic_kernel(loaded):
    """`loaded` with bitsandbytes' generic CPU path on every host. Where bitsandbytes finds AVX512_BF16, each
    4-bit layer would repack its weight at its first call for a kernel that computes in bfloat16, which the
    float32 comparisons here are not about (test_repacked_nf4_weights_stay_in_bitsandbytes_kernel is)."""
    for module in loaded.model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return loaded


@pytest.fixture(scope="module")
def nf4():
    return generic_kernel(load("nf4", "float32"))


def test_nf4_weights_are_dequantized_once_and_give_transformers_logits(nf4):
    fused = FusedForward(nf4.model, checkpoint=nf4.checkpoint)
    assert fused.kind == (
        "fused, bitsandbytes 4-bit projections dequantized once to float32 "
        "(bitsandbytes' CPU matmul dequantizes every call)"
    )
    # /health counts the copies: every layer's projections in float32 (the logits matmul is not quantized).
    assert fused.extra_bytes == 4 * sum(
        m.in_features * m.out_features for name, m in nf4.model.named_modules() if type(m).__name__ == "Linear4bit"
    )
    assert not any(p.int4 is not None for layer in fused.layers for p in (layer.qkv, layer.down))  # no GGUF grids
    theirs = teacher_forced(TransformersForward(nf4.model, "reference"), nf4.model, nf4.tokenizer)
    ours = teacher_forced(fused, nf4.model, nf4.tokenizer)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_nf4_weights_stay_in_four_bits_where_a_copy_would_not_fit(nf4, monkeypatch):
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=64 * 2**20))
    fused = FusedForward(nf4.model)
    assert "kept in 4 bits: a float32 copy (0.4 GiB) would take over half the free memory" in fused.kind
    assert isinstance(fused.layers[0].qkv, Modules) and fused.extra_bytes == 0
    theirs = teacher_forced(TransformersForward(nf4.model, "reference"), nf4.model, nf4.tokenizer)
    ours = teacher_forced(fused, nf4.model, nf4.tokenizer)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def repacked(layers) -> list[bool]:
    return [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers]


def test_repacked_nf4_weights_stay_in_bitsandbytes_kernel(monkeypatch):
    """Where bitsandbytes finds AVX512_BF16 (its own check of the CPU), a 4-bit layer's first call repacks its
    weight for a kernel of its own; a copy dequantized from that layout is not what bitsandbytes computes, so
    the fused pass runs those layers as they are. Elsewhere the repacked layout is faked: the choice is tested
    on any CPU, bitsandbytes' kernel only where it can run."""
    from bitsandbytes.functional import has_avx512bf16

    loaded = load("nf4", "float32")
    layers = [m for m in loaded.model.modules() if type(m).__name__ == "Linear4bit"]
    assert not any(repacked(layers))  # nothing repacks at load: the fused pass built first dequantizes
    theirs = None
    if has_avx512bf16():
        theirs = teacher_forced(TransformersForward(loaded.model, "reference"), loaded.model, loaded.tokenizer)
        assert all(repacked(layers))
    else:
        for m in layers:
            monkeypatch.setattr(m.weight.quant_state, "packing_format_for_cpu", True, raising=False)
    fused = FusedForward(loaded.model)
    assert fused.kind == (
        "fused, bitsandbytes 4-bit projections kept in 4 bits: bitsandbytes repacked them for its AVX512_BF16 kernel"
    )
    assert isinstance(fused.layers[0].qkv, Modules) and fused.extra_bytes == 0
    if theirs is not None:
        ours = teacher_forced(fused, loaded.model, loaded.tokenizer)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_int8_layers_run_inside_the_fused_pass():
    int8 = load("int8")  # bitsandbytes' 8-bit layers compute in float16
    fused = FusedForward(int8.model)
    assert fused.kind == "fused, bitsandbytes 8-bit projections"
    assert fused.graph_blocker == "bitsandbytes' 8-bit layers"
    theirs = teacher_forced(TransformersForward(int8.model, "reference"), int8.model, int8.tokenizer)
    ours = teacher_forced(fused, int8.model, int8.tokenizer)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # float16 activations: the two passes round norms and rotations in different orders.
    assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max()
