"""Placement over devices: settings reach accelerate's device map, layers offload to disk, tokens stay the same."""

import asyncio

import httpx
import pytest
from pydantic import ValidationError

from llmchat.engine import Engine, EngineConfig, SchedulerConfig
from llmchat.engine.loader import ModelConfig, ModelLoadError, load_model, parse_max_memory
from llmchat.engine.sampling import SamplingParams
from llmchat.lifecycle import model_config
from llmchat.server import create_app
from llmchat.settings import Settings
from tests.conftest import start_server

# The bundled model is about 515 MiB in float32: a 400 MiB CPU budget leaves some layers for disk,
# and 100 MiB is less than its tied embedding, so the whole model goes to disk.
SPLIT = "cpu=400MiB"
ALL_ON_DISK = "cpu=100MiB"
PROMPTS = ["What is the capital of France?", "List three primary colors."]


def split_settings(max_memory: str, offload_dir) -> Settings:
    return Settings(
        port=0, device="cpu", dtype="float32", device_map="auto", max_memory=max_memory, offload_dir=offload_dir
    )


@pytest.fixture(scope="module")
def whole(loaded):
    """The model on one device, decoding in float32 throughout (no 4-bit weights), as a split model does."""
    return loaded


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return load_model(model_config(split_settings(SPLIT, tmp_path_factory.mktemp("offload"))))


def greedy_tokens(loaded) -> list[list[int]]:
    """Both prompts as one batch; the first stops early, so the batch drops a row and decodes on."""
    rendered = [
        loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        for p in PROMPTS
    ]
    ids = [list(r["input_ids"]) for r in rendered]
    max_tokens = [4, 10]

    async def main():
        engine = Engine(loaded, EngineConfig(SchedulerConfig(max_running=4)))
        engine.start()
        try:
            params = [SamplingParams(max_tokens=n, temperature=0.0) for n in max_tokens]
            seqs = [engine.submit(p, sp) for p, sp in zip(ids, params, strict=True)]
            for seq in seqs:
                async for _ in engine.stream(seq):
                    pass
            return [seq.completion_ids for seq in seqs]
        finally:
            await asyncio.to_thread(engine.shutdown)

    return asyncio.run(main())


def test_max_memory_budget_offloads_layers_to_disk(split):
    where = set(split.model.hf_device_map.values())
    assert where == {"cpu", "disk"}
    on_cpu = {
        id(p): p.nbytes
        for name, device in split.model.hf_device_map.items()
        if device == "cpu"
        for p in split.model.get_submodule(name).parameters()
    }
    assert sum(on_cpu.values()) <= parse_max_memory(SPLIT)["cpu"]
    described = split.describe()
    assert described["device_map"] == "auto" and described["max_memory"] == SPLIT
    assert set(described["placement"]) == {"cpu", "disk"}
    assert sum(described["placement"].values()) == len(split.model.hf_device_map)


def test_split_model_generates_the_same_greedy_tokens(whole, split):
    expected = greedy_tokens(whole)
    assert all(expected)
    assert greedy_tokens(split) == expected


def test_model_wholly_on_disk_generates_the_same_greedy_tokens(whole, tmp_path):
    # Every parameter sits on the meta device here, so inputs must go to the hooks' main device instead.
    on_disk = load_model(model_config(split_settings(ALL_ON_DISK, tmp_path)))
    assert on_disk.describe()["placement"] == {"disk": 1}
    assert greedy_tokens(on_disk) == greedy_tokens(whole)


def test_health_reports_placement(split):
    live = start_server(create_app(Settings(port=0), engine=Engine(split)))
    try:
        health = httpx.get(f"{live.base_url}/health").json()
    finally:
        live.stop()
    assert health["status"] == "ok"
    assert health["device_map"] == "auto" and health["max_memory"] == SPLIT
    assert health["placement"] == split.describe()["placement"]
    assert health["forward"] == "transformers (the model is placed by a device map)"


def test_single_device_placement_is_one_entry(whole):
    described = whole.describe()
    assert described["device_map"] == "single" and described["max_memory"] is None
    assert described["placement"] == {"cpu": 1}


def test_max_memory_parses_to_accelerate_form():
    assert parse_max_memory("0=20GiB, 1 = 1.5GB,CPU=512mib") == {0: 20 * 2**30, 1: 1_500_000_000, "cpu": 512 * 2**20}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu", "is not DEVICE=SIZE"),
        ("0=20GiB,", "is not DEVICE=SIZE"),
        ("gpu0=20GiB", "unknown device 'gpu0'"),
        ("disk=100GiB", "disk takes no cap"),
        ("0=1GiB,0=2GiB", "capped twice"),
        ("cpu=64", "is not a size"),
        ("cpu=lots", "is not a size"),
    ],
)
def test_max_memory_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_max_memory(text)
    with pytest.raises(ValidationError, match=message):
        Settings(device_map="auto", max_memory=text)


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCHAT_DEVICE_MAP", "sequential")
    monkeypatch.setenv("LLMCHAT_MAX_MEMORY", "0=20GiB,cpu=64GiB")
    monkeypatch.setenv("LLMCHAT_OFFLOAD_DIR", str(tmp_path))
    config = model_config(Settings())
    assert (config.device_map, config.max_memory, config.offload_dir) == ("sequential", "0=20GiB,cpu=64GiB", tmp_path)


def test_max_memory_needs_a_device_map():
    with pytest.raises(ValidationError, match="set device_map=auto"):
        Settings(max_memory="cpu=1GiB")
    assert Settings(max_memory="").max_memory is None  # an empty line in an EnvironmentFile means unset


def test_gpu_caps_with_device_cpu_are_refused():
    cache_dir = Settings().cache_dir
    config = ModelConfig("bundled", device="cpu", device_map="auto", max_memory="0=1GiB", cache_dir=cache_dir)
    with pytest.raises(ModelLoadError, match="caps GPU 0 but device=cpu"):
        load_model(config)


def test_quantized_model_that_would_offload_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes")
    config = ModelConfig(
        "bundled",
        device="cpu",
        quantization="nf4",
        device_map="auto",
        max_memory=ALL_ON_DISK,
        offload_dir=tmp_path,
        cache_dir=Settings().cache_dir,
    )
    with pytest.raises(ModelLoadError, match="quantization=nf4 with device_map=auto cannot offload layers to disk"):
        load_model(config)
