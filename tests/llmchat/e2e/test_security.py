"""API keys, CORS, the body size limit and the exposed-bind warning, against a real server."""

import asyncio
import logging

import httpx
import openai
import pytest
from fastapi import FastAPI

from hrserve import install_access_controls
from hrserve.settings import ServiceSettings
from llmchat.engine import Engine
from llmchat.engine.loader import ModelConfig, load_model
from llmchat.server import create_app
from llmchat.settings import Settings
from tests.conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
KEYS = ("sk-first-0123456789", "sk-second-abcdefghij")
ORIGIN = "https://ui.example"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"# ops team\n{KEYS[1]}\n")
    settings = Settings(port=0, api_keys=KEYS[0], api_key_file=key_file, cors_origins=ORIGIN, max_body_bytes=65536)
    loaded = load_model(ModelConfig("bundled", device="cpu", cache_dir=settings.cache_dir))
    server = start_server(create_app(settings, engine=Engine(loaded)))
    yield server.base_url
    server.stop()


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_works_with_the_sdk(guarded, key):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(**BODY).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS[0]}])
def test_missing_or_wrong_key_is_401_in_the_openai_envelope(guarded, headers):
    for r in (
        httpx.post(f"{guarded}/v1/chat/completions", json=BODY, headers=headers),
        httpx.get(f"{guarded}/v1/models", headers=headers),
    ):
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]


def test_sdk_with_a_wrong_key_gets_authentication_error(guarded):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_anthropic_routes_accept_x_api_key_and_answer_in_their_envelope(guarded):
    r = httpx.post(f"{guarded}/v1/messages", json={}, headers={"x-api-key": "sk-wrong"})
    assert r.status_code == 401
    assert r.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": r.json()["error"]["message"]},
    }
    # A good key gets past authentication (the route itself answers).
    assert httpx.post(f"{guarded}/v1/messages", json={}, headers={"x-api-key": KEYS[0]}).status_code != 401


# vLLM's tokenizer routes and the metrics: keys protect them as they protect /v1.
BEYOND_V1 = [
    ("POST", "/tokenize", {"model": MODEL, "prompt": "Hi"}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [19556]}),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(("method", "path", "body"), BEYOND_V1, ids=[path for _, path, _ in BEYOND_V1])
def test_tokenizer_routes_and_metrics_need_a_key(guarded, method, path, body):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        r = httpx.request(method, f"{guarded}{path}", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    r = httpx.request(method, f"{guarded}{path}", json=body, headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert r.status_code == 200, r.text


def test_health_and_version_stay_open(guarded):
    assert httpx.get(f"{guarded}/health").status_code == 200
    assert httpx.get(f"{guarded}/version").status_code == 200


def test_keys_never_reach_the_logs(guarded, caplog):
    with caplog.at_level(logging.DEBUG):
        httpx.post(f"{guarded}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {KEYS[0]}"})
        httpx.post(f"{guarded}/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer sk-leak-me"})
    text = caplog.text + repr(Settings(api_keys=",".join(KEYS)))
    assert not any(secret in text for secret in (*KEYS, "sk-leak-me"))


def test_cors_allows_only_configured_origins(guarded):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(f"{guarded}/v1/chat/completions", headers={"Origin": ORIGIN} | preflight)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{guarded}/v1/chat/completions", headers={"Origin": "https://evil.example"} | preflight)
    assert "access-control-allow-origin" not in other.headers


def test_body_over_the_limit_is_413_whether_sized_or_chunked(guarded):
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 70000}]}
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    sized = httpx.post(f"{guarded}/v1/chat/completions", json=big, headers=headers)
    assert sized.status_code == 413 and sized.json()["error"]["code"] == "request_too_large"

    def chunks():
        data = httpx.Request("POST", "/", json=big).content
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    chunked = httpx.post(
        f"{guarded}/v1/chat/completions", content=chunks(), headers=headers | {"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert httpx.post(f"{guarded}/v1/chat/completions", json=BODY, headers=headers).status_code == 200


def tiny_app(**settings) -> httpx.AsyncClient:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    install_access_controls(app, ServiceSettings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_health_can_require_a_key():
    async def main():
        async with tiny_app(api_keys="k-123", health_requires_key=True) as client:
            assert (await client.get("/health")).status_code == 401
            assert (await client.get("/health", headers={"Authorization": "Bearer k-123"})).status_code == 200

    asyncio.run(main())


def test_binding_beyond_loopback_without_keys_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="hrserve.auth"):
        tiny_app(host="0.0.0.0")
    assert "without API keys" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hrserve.auth"):
        tiny_app(host="127.0.0.1")
        tiny_app(host="0.0.0.0", api_keys="k-123")
    assert "without API keys" not in caplog.text
