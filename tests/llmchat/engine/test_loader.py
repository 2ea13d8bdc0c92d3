"""Model loading: sources, device and quantization choices, the GGUF cache, and 4-bit / 8-bit loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmchat.engine import cpu, gpu
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
    caps = cpu.capabilities()
    dtype, why = pick_dtype("auto", "cpu")
    if caps["amx_bf16"]:
        assert dtype == torch.bfloat16 and "AMX" in why
    elif not caps["avx512_bf16"]:
        assert dtype == torch.float32 and "emulated" in why
    else:
        assert "ms in float32" in why
    assert pick_quantization("auto", "cpu") == ("none", "auto quantizes only on a GPU")
    assert pick_quantization("int8", "cpu") == ("int8", "chosen in the settings")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no GPU"):
            pick_device("cuda")


@pytest.mark.parametrize(
    ("native_bf16", "expected"),
    [(True, torch.bfloat16), (False, torch.float16)],
    ids=["compute capability 8+ or recent AMD", "older GPU"],
)
def test_gpu_dtype_is_bfloat16_only_where_the_gpu_computes_it(monkeypatch, native_bf16, expected):
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert pick_dtype("auto", "cuda")[0] == expected
    assert asked == [False], "emulated bfloat16 does not count"
    assert pick_dtype("bfloat16", "cuda") == (torch.bfloat16, "chosen in the settings")


def fake_cpu(monkeypatch, **flags: bool) -> None:
    monkeypatch.setattr(cpu, "capabilities", lambda: dict.fromkeys(cpu.FLAGS, False) | flags)


@pytest.mark.parametrize(
    ("flags", "timings", "expected"),
    [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}, None, torch.bfloat16),
        ({"avx2": True}, None, torch.float32),
        ({"avx2": True, "avx512_f": True}, None, torch.float32),
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, (2.0, 1.0), torch.bfloat16),
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, (2.0, 1.9), torch.float32),  # within the margin
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, (1.0, 1.5), torch.float32),
    ],
    ids=["amx", "avx2", "avx512 without bf16", "avx512_bf16, bf16 faster", "a tie", "bf16 slower"],
)
def test_cpu_dtype_is_bfloat16_only_where_it_computes_faster(monkeypatch, flags, timings, expected):
    """Flags decide where they can; AVX512_BF16 without AMX is measured (faked timings here)."""
    fake_cpu(monkeypatch, **flags)
    timed = []

    def timer(dtype: torch.dtype) -> float:
        timed.append(dtype)
        return timings[0] if dtype == torch.float32 else timings[1]

    dtype, why = cpu.pick_dtype(timer)
    assert dtype == expected, why
    assert timed == ([torch.float32, torch.bfloat16] if timings else [])


def test_the_measurement_runs_on_this_cpu(monkeypatch):
    """The real timing path, whatever this CPU is: it reports both timings and keeps the faster by the margin."""
    fake_cpu(monkeypatch, avx2=True, avx512_f=True, avx512_bf16=True)
    timed = {}

    def timer(dtype: torch.dtype) -> float:
        timed[dtype] = cpu.time_matmuls(dtype)
        return timed[dtype]

    dtype, why = cpu.pick_dtype(timer)
    fp32, bf16 = timed[torch.float32], timed[torch.bfloat16]
    assert dtype == (torch.bfloat16 if bf16 < cpu.MARGIN * fp32 else torch.float32)
    assert f"{fp32 * 1e3:.1f} ms in float32" in why and f"{bf16 * 1e3:.1f} ms in bfloat16" in why


def test_the_cpu_line_names_what_it_has_and_lacks(monkeypatch):
    fake_cpu(monkeypatch, avx2=True)
    assert cpu.describe() == "avx2 (no avx512_f, avx512_bf16, amx_bf16)"
    fake_cpu(monkeypatch, **dict.fromkeys(cpu.FLAGS, True))
    assert cpu.describe() == "avx2 avx512_f avx512_bf16 amx_bf16"


GIB = 2**30


@pytest.mark.parametrize(
    ("weights", "free", "expected"),
    [
        (0.27 * GIB, 80 * GIB, "none"),  # the bundled model on any GPU
        (16 * GIB, 80 * GIB, "none"),  # an 8B model in bfloat16 on an 80 GiB card
        (16 * GIB, 24 * GIB, "nf4"),  # the same on a 24 GiB card
        (140 * GIB, 80 * GIB, "nf4"),
    ],
)
def test_auto_quantization_on_a_gpu_is_chosen_by_free_memory(monkeypatch, weights, free, expected):
    monkeypatch.setattr(gpu, "free_bytes", lambda device=None: int(free))
    choice, why = pick_quantization("auto", "cuda", lambda: int(weights))
    assert choice == expected
    assert "half the GPU's free memory" in why and f"{free / GIB:.1f} GiB" in why


def test_weight_bytes_are_counted_without_loading(tmp_path):
    config = ModelConfig("bundled", device="cpu", cache_dir=CACHE)
    loaded = load_model(config)
    path = str(converted_dir(resolve_source("bundled"), CACHE))
    parameters = sum(p.numel() for p in loaded.model.parameters())
    assert gpu.weight_bytes(path, trust_remote_code=False) == 2 * parameters
    health = loaded.describe()
    assert health["quantization_reason"] == "auto quantizes only on a GPU"
    assert health["dtype"] in ("float32", "bfloat16") and health["dtype_reason"]
    assert health["cpu"] == cpu.describe()


def test_float16_does_not_overflow_on_the_bundled_model():
    """float16 is what older GPUs get (and int8 forces): the bundled model's logits stay finite and its greedy
    tokens match float32's."""
    tokens = {}
    for dtype in ("float16", "float32"):
        loaded = load_model(ModelConfig("bundled", device="cpu", dtype=dtype, cache_dir=CACHE))
        ids = loaded.tokenizer("Write a long story about the sea, with many details.", return_tensors="pt")
        with torch.inference_mode():
            out = loaded.model.generate(
                **ids, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        assert all(bool(torch.isfinite(step).all()) for step in out.logits), dtype
        tokens[dtype] = out.sequences[0].tolist()
    assert tokens["float16"] == tokens["float32"]


def test_second_load_uses_the_converted_cache():
    config = ModelConfig("bundled", device="cpu", cache_dir=CACHE)
    first = load_model(config)  # converts unless an earlier test or start already did
    cached = converted_dir(first.source, CACHE)
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    second = load_model(config)
    assert second.cache_hit is True
    assert second.describe()["weights_cache_hit"] is True


def test_a_conversion_another_process_finished_first_is_used(tmp_path, monkeypatch):
    """Two servers (replicas, or a test beside a running service) starting on one GGUF both convert it; the one
    that finishes second keeps the first's folder rather than failing its start. Faked converter: the race is
    the point, not the minute of dequantizing."""
    import transformers

    from llmchat.engine.loader import ModelSource, convert_gguf

    target = tmp_path / "converted" / "m"

    class Converted:
        config = object()

        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_text("ours")
            target.mkdir(exist_ok=True)  # meanwhile the other process renames its own into place
            (target / "model.safetensors").write_text("theirs")

    class Loader:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return Converted()

    monkeypatch.setattr(transformers, "AutoTokenizer", Loader)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Loader)
    convert_gguf(ModelSource("gguf", str(tmp_path), "m", "m.gguf"), target)
    assert (target / "model.safetensors").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # no half-written folder left behind


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


@pytest.mark.parametrize(("operator", "expected"), [(None, "1"), ("0", "0")])
def test_rocm_attention_kernels_are_switched_on_before_torch_loads(operator, expected):
    """torch reads TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL when imported; `just serve` (no unit) needs it too."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"}
    if operator is not None:
        env["TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"] = operator
    code = "import sys, os, llmchat; assert 'torch' not in sys.modules; print(os.environ[sys.argv[1]])"
    out = subprocess.run(
        [sys.executable, "-c", code, "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == expected, out.stderr
