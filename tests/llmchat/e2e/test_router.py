"""Two real llmchat replicas behind a real LiteLLM Router in this process, configured by bin/gen-litellm.py.

Each replica is its own process exporting spans over OTLP to one receiver, told apart by their
service.instance.id, so the test sees which replica served what and that the caller's trace reached it.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.conftest import spawn_llmchat
from tests.hrserve.otlp_receiver import OTLPReceiver
from tests.llmchat.e2e.test_otlp_export import FAST_EXPORT, PARENT_ID, TRACE_ID, wait_until

ROOT = Path(__file__).resolve().parents[3]
MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
REPLICAS = ("a", "b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Replicas a and b (started together), the generated config, and the OTLP receiver both export to."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    with OTLPReceiver() as receiver:
        servers = {}
        for name in REPLICAS:
            env = FAST_EXPORT | {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{receiver.port}",
                "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id=llmchat-{name}",
            }
            servers[name] = spawn_llmchat(tmp_path_factory.mktemp(name), env, wait_ready=False)
        try:
            for server in servers.values():
                server.wait_ready()
            hosts = [server.base_url.removeprefix("http://") for server in servers.values()]
            generated = subprocess.run(
                [sys.executable, str(ROOT / "bin/gen-litellm.py"), *hosts, "--retries", "3", "--cooldown", "120"],
                check=True,
                capture_output=True,
                text=True,
            )
            yield servers, json.loads(generated.stdout), receiver
        finally:
            for server in servers.values():
                if server.proc.poll() is None:
                    server.proc.kill()
                server.proc.wait()


def router(config: dict):
    import litellm

    return litellm.Router(model_list=config["model_list"], **config["router_settings"])


def served_by(receiver) -> dict[str, int]:
    """How many chat spans each replica exported."""
    counts = {}
    for resource, span in receiver.spans:
        if span.name == f"chat {MODEL}":
            counts[resource["service.instance.id"]] = counts.get(resource["service.instance.id"], 0) + 1
    return counts


async def arriving(calls, gap_s: float = 0.2):
    """Runs the calls as clients arriving a moment apart.

    least-busy counts a request once its call has started; a burst issued in one instant sees the same
    counts everywhere and lands on one replica.
    """
    tasks = []
    for call in calls:
        tasks.append(asyncio.ensure_future(call))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks)


async def stream_text(r, **kwargs) -> str:
    stream = await r.acompletion(model=MODEL, messages=ASK, max_tokens=16, stream=True, **kwargs)
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])


async def tool_call(r):
    response = await r.acompletion(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    assert response.choices[0].finish_reason == "tool_calls", response
    (call,) = response.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    return call


def test_config_has_one_deployment_per_replica(cluster):
    servers, config, _ = cluster
    bases = [d["litellm_params"]["api_base"] for d in config["model_list"]]
    assert bases == [f"{s.base_url}/v1" for s in servers.values()]
    assert {d["model_name"] for d in config["model_list"]} == {MODEL}, "the model name is asked from the replicas"
    assert config["router_settings"]["routing_strategy"] == "least-busy"
    assert config["general_settings"]["background_health_checks"] is True


def test_concurrent_streams_and_tool_calls_are_spread_over_both_replicas(cluster):
    _, config, receiver = cluster
    before = served_by(receiver)

    async def run():
        r = router(config)
        return await arriving([stream_text(r) for _ in range(4)] + [tool_call(r) for _ in range(4)])

    texts = asyncio.run(run())[:4]
    assert all(texts), texts
    wait_until(lambda: sum(served_by(receiver).values()) - sum(before.values()) == 8)
    after = served_by(receiver)
    assert all(after.get(f"llmchat-{name}", 0) > before.get(f"llmchat-{name}", 0) for name in REPLICAS), after


def test_the_callers_trace_context_reaches_the_replica(cluster):
    _, config, receiver = cluster
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    text = asyncio.run(stream_text(router(config), extra_headers={"traceparent": traceparent}))
    assert text

    def traced(name: str) -> list:
        return [s for _, s in receiver.spans if s.trace_id.hex() == TRACE_ID and s.name == name]

    # A stream's chat span ends, and may be exported, before the server span that wraps it.
    wait_until(lambda: traced("POST /v1/chat/completions") and traced(f"chat {MODEL}"))
    (server,) = traced("POST /v1/chat/completions")
    assert server.parent_span_id.hex() == PARENT_ID
    assert any(s.parent_span_id == server.span_id for s in traced(f"chat {MODEL}"))


def test_killing_a_replica_mid_run_fails_no_request(cluster):
    """Requests in flight on the killed replica are retried on the other; later ones avoid it.

    In-flight requests here are not streamed: a stream that already sent tokens cannot be replayed by
    any router, so a client sees that one break (README, Scaling out).
    """
    servers, config, receiver = cluster
    victim, survivor = servers["a"], servers["b"]

    async def run():
        r = router(config)
        asks = [
            asyncio.ensure_future(r.acompletion(model=MODEL, messages=ASK, max_tokens=48, temperature=0))
            for _ in range(6)
        ]
        async with httpx.AsyncClient() as http:
            while (await http.get(f"{victim.base_url}/health")).json()["num_running"] == 0:
                await asyncio.sleep(0.05)
        victim.proc.send_signal(signal.SIGKILL)
        answered = await asyncio.gather(*asks)
        later = await asyncio.gather(*[stream_text(r) for _ in range(2)], tool_call(r), tool_call(r))
        return answered, later

    answered, later = asyncio.run(run())
    assert victim.proc.wait(10) == -signal.SIGKILL
    assert all(response.choices[0].message.content for response in answered)
    # The victim had requests running when it died, and the survivor answered them instead.
    assert f"{survivor.base_url}/v1" in {response._hidden_params["api_base"] for response in answered}
    assert all(later[:2]), later
    assert httpx.get(f"{survivor.base_url}/health").json()["status"] == "ok"
