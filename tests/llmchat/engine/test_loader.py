"""Model loading: sources, device and quantization choices, the GGUF cache, and 4-bit / 8-bit loads."""

import os
from pathlib import Path

import pytest
import torch

from llmchat.engine.loader import (
    ModelConfig,
    ModelLoadError,
    bundled_gguf,
    converted_dir,
    load_model,
    pick_device,
    pick_dtype,
    pick_quantization,
    resolve_source,
)
from llmchat.settings import Settings

CACHE = Settings().cache_dir


def test_bundled_model_resolves_to_packaged_gguf():
    source = resolve_source("bundled")
    assert source.kind == "gguf" and source.name == "SmolLM2-135M-Instruct"
    assert (Path(source.path) / source.gguf_file) == bundled_gguf()
    assert bundled_gguf().stat().st_size > 50_000_000


def test_sources(tmp_path):
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)).kind == "dir"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).kind == "gguf"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_source(str(tmp_path / ".."))


def test_auto_choices_on_this_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto") == expected
    amx = torch.cpu.get_capabilities().get("amx_bf16")
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if amx else torch.float32)
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    assert pick_quantization("auto", "cpu") == "none"
    assert pick_quantization("auto", "cuda") == "nf4"
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no GPU"):
            pick_device("cuda")


def test_second_load_uses_the_converted_cache():
    config = ModelConfig("bundled", device="cpu", cache_dir=CACHE)
    first = load_model(config)  # converts unless an earlier test or start already did
    cached = converted_dir(first.source, CACHE)
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    second = load_model(config)
    assert second.cache_hit is True
    assert second.describe()["weights_cache_hit"] is True


def _greedy(loaded, question: str, max_new_tokens: int = 12) -> str:
    tok = loaded.tokenizer
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(("quantization", "layer"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bitsandbytes_quantized_load_generates(quantization, layer):
    pytest.importorskip("bitsandbytes")
    loaded = load_model(ModelConfig("bundled", device="cpu", quantization=quantization, cache_dir=CACHE))
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert layer in kinds
    if quantization == "nf4":
        weight = loaded.model.model.layers[0].mlp.down_proj.weight
        assert weight.quant_state.quant_type == "nf4"
        assert weight.dtype == torch.uint8  # two 4-bit values per byte
    full = load_model(ModelConfig("bundled", device="cpu", quantization="none", cache_dir=CACHE))
    assert loaded.memory_bytes < full.memory_bytes * 0.7
    assert "Paris" in _greedy(loaded, "What is the capital of France?")


def test_cache_key_survives_reinstall_but_not_new_content(tmp_path):
    original = resolve_source("bundled")
    copy = tmp_path / original.gguf_file
    copy.write_bytes(bundled_gguf().read_bytes())
    os.utime(copy, (1, 1))  # a reinstall gives the same bytes a new mtime
    assert converted_dir(resolve_source(str(copy)), CACHE) == converted_dir(original, CACHE)
    with copy.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    assert converted_dir(resolve_source(str(copy)), CACHE) != converted_dir(original, CACHE)
