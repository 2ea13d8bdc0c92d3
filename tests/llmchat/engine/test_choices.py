"""Choices timed at load are kept per machine and model: a later start makes the same ones without timing them,
unless told to measure again or anything they depend on has changed."""

import json
from dataclasses import replace

import pytest
import torch

from llmchat.engine import choices, cpu, int4
from llmchat.engine.choices import Choices, kept_for
from llmchat.engine.fused_forward import FusedForward
from llmchat.engine.loader import ModelConfig, load_model, pick_dtype
from llmchat.settings import Settings

CACHE = Settings().cache_dir


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig("bundled", device="cpu", dtype="float32", cache_dir=CACHE))


def fake_timings(monkeypatch, rows: int, torch_faster: bool) -> list[int]:
    """Crossover timings where the dense matmuls win beyond `rows`, and torch's kernel faster or not; returns the
    list of row counts timed, to see whether anything was."""
    timed = []

    def timer(pairs, width, dtype):
        return lambda n: timed.append(n) or (1.0, 0.5 if n <= rows else 2.0)

    monkeypatch.setattr(int4, "timer", timer)
    monkeypatch.setattr(int4, "torch_kernel_is_faster", lambda grids, width, dtype: torch_faster)
    return timed


def rows_of(forward: FusedForward) -> tuple[int, ...]:
    layer = forward.layers[0]
    return tuple(p.int4_rows for p in (layer.qkv, layer.o, layer.gate_up, layer.down, forward.lm_head))


def test_a_later_start_reuses_the_kept_kernels_and_crossovers(loaded, monkeypatch, tmp_path):
    path = tmp_path / "kept.json"
    timed = fake_timings(monkeypatch, rows=8, torch_faster=True)
    first = Choices(path, {"model": "m"})
    measured = FusedForward(loaded.model, checkpoint=loaded.checkpoint, choices=first)
    assert timed and first.state == "measured now" and path.is_file()
    assert rows_of(measured) == (8,) * 5 and int4.TORCH_KERNEL in measured.kind

    # The next start's timings would choose otherwise: it must not take them.
    timed = fake_timings(monkeypatch, rows=2, torch_faster=False)
    again = Choices(path, {"model": "m"})
    reused = FusedForward(loaded.model, checkpoint=loaded.checkpoint, choices=again)
    assert timed == [] and again.state == "reused"
    assert reused.kind == measured.kind and rows_of(reused) == rows_of(measured)
    assert {reused.layers[0].qkv.int4.kernel, reused.lm_head.int4.kernel} == {int4.TORCH_KERNEL}
    assert again.describe()["values"] == first.describe()["values"]

    remeasured = Choices(path, {"model": "m"}, remeasure=True)
    fresh = FusedForward(loaded.model, checkpoint=loaded.checkpoint, choices=remeasured)
    assert timed and remeasured.state == "measured now" and rows_of(fresh) == (2,) * 5
    assert Choices(path, {"model": "m"}).values == remeasured.values  # the new ones replace the old


def test_choices_kept_for_another_machine_or_model_are_measured_again(tmp_path):
    path = tmp_path / "kept.json"
    Choices(path, {"cpu": "A"}).get("x", lambda: 1)
    calls = []
    other = Choices(path, {"cpu": "B"})
    assert other.get("x", lambda: calls.append(1) or 2) == 2 and calls == [1]
    path.write_text("{not json")
    broken = Choices(path, {"cpu": "B"})
    assert broken.get("x", lambda: 3) == 3 and broken.state == "measured now"
    assert json.loads(path.read_text())["values"] == {"x": 3}


def test_each_thing_the_timings_depend_on_has_its_own_file(monkeypatch, tmp_path):
    base = kept_for(tmp_path, "model-a").path
    assert kept_for(tmp_path, "model-a").path == base
    assert kept_for(tmp_path, "model-b").path != base
    assert base.parent == tmp_path / "measured" and base.name.startswith("model-a-")
    monkeypatch.setattr(cpu, "describe", lambda: "avx2 (no avx512_f, avx512_bf16, amx_bf16)")
    monkeypatch.setattr(choices, "cpu_model", lambda: "another CPU")
    assert kept_for(tmp_path, "model-a").path != base
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert kept_for(tmp_path, "model-a").path != base


def test_a_cache_that_cannot_be_written_costs_the_timings_not_the_start(tmp_path):
    (tmp_path / "file").write_text("")
    kept = Choices(tmp_path / "file" / "measured" / "kept.json", {})  # under a file: no folder can be made
    assert kept.get("x", lambda: 5) == 5 and kept.get("x", lambda: 6) == 5
    assert kept.state == "partly reused"


def test_the_timed_dtype_is_kept_on_an_avx512_bf16_cpu(monkeypatch, tmp_path):
    """Where the flags leave the dtype open (AVX512_BF16 without AMX), the timings behind it are kept and read back;
    where they decide it, nothing is timed or kept."""
    monkeypatch.setattr(cpu, "capabilities", lambda: dict.fromkeys(cpu.FLAGS, True) | {"amx_bf16": False})
    seconds = {torch.float32: 2e-3, torch.bfloat16: 1e-3}
    monkeypatch.setattr(cpu, "time_matmuls", lambda dtype: seconds[dtype])
    first = Choices(tmp_path / "kept.json", {})
    dtype, why = pick_dtype("auto", "cpu", first)
    assert dtype == torch.bfloat16 and "2.0 ms in float32, 1.0 ms in bfloat16" in why
    seconds = {torch.float32: 1e-3, torch.bfloat16: 2e-3}  # timings that would now pick float32
    again = Choices(tmp_path / "kept.json", {})
    assert pick_dtype("auto", "cpu", again) == (dtype, why) and again.state == "reused"

    monkeypatch.setattr(cpu, "capabilities", lambda: dict.fromkeys(cpu.FLAGS, True))  # AMX decides alone
    untimed = Choices(tmp_path / "amx.json", {})
    assert pick_dtype("auto", "cpu", untimed)[0] == torch.bfloat16 and untimed.state == "none"


def test_health_says_whether_the_choices_were_measured_or_reused(loaded, monkeypatch, tmp_path):
    fake_timings(monkeypatch, rows=4, torch_faster=False)
    for state in ("measured now", "reused"):
        kept = Choices(tmp_path / "kept.json", {"model": "m"})
        FusedForward(loaded.model, checkpoint=loaded.checkpoint, choices=kept)
        health = replace(loaded, choices=kept).describe()["measured"]
        assert health["state"] == state and health["file"] == str(kept.path) and health["measured_at"]
        assert {value["rows"] for key, value in health["values"].items() if key.startswith("4-bit ")} == {4}
    assert loaded.describe()["measured"]["state"] == "none"  # the fixture's load timed nothing on float32
