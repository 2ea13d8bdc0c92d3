"""A restarted llmchat makes the choices its first start measured: the same forward pass, the same greedy replies."""

import httpx

from llmchat.settings import Settings
from tests.conftest import spawn_llmchat

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def greedy_replies(base_url: str, model: str) -> list[str]:
    replies = []
    for prompt in PROMPTS:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0}
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        replies.append(reply.json()["choices"][0]["message"]["content"])
    return replies


def test_a_restart_reuses_the_measured_choices_and_replies_alike(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shared = Settings().cache_dir
    for name in ("converted", "kernels"):  # the converted weights and built kernel, not the kept choices
        (shared / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(shared / name)
    starts = []
    for run in ("first", "second"):
        log_dir = tmp_path / run
        log_dir.mkdir()
        server = spawn_llmchat(log_dir, {"LLMCHAT_CACHE_DIR": str(cache), "LLMCHAT_DEVICE": "cpu"})
        try:
            health = httpx.get(f"{server.base_url}/health").json()
            starts.append((health, greedy_replies(server.base_url, health["model"])))
        finally:
            assert server.stop() == 0
    (first, first_replies), (second, second_replies) = starts
    kept = list((cache / "measured").glob("*.json"))
    assert len(kept) == 1 and first["measured"]["file"] == second["measured"]["file"] == str(kept[0])
    # The bundled GGUF's 4-bit weights get their kernels and crossovers timed on every CPU.
    assert (first["measured"]["state"], second["measured"]["state"]) == ("measured now", "reused")
    assert second["measured"]["values"] == first["measured"]["values"]
    for field in ("forward", "dtype", "dtype_reason", "forward_memory_bytes"):
        assert second[field] == first[field], field
    assert second_replies == first_replies
