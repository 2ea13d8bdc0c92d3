"""bin/gen-litellm.py: replicas named as hosts, ports and template instances become Router deployments.

The Router itself, with real replicas behind it, is tested in tests/llmchat/test_router.py.
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bin/gen-litellm.py"), *args], capture_output=True, text=True, timeout=60
    )


def bases(config: dict, group: str) -> list[str]:
    return [d["litellm_params"]["api_base"] for d in config["model_list"] if d["model_name"] == group]


def test_hosts_ports_and_instances():
    r = gen("gpu1", "gpu2@0-2", "10.0.0.7:8000", "[::1]:9000", "--model", "m")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert bases(config, "m") == [
        "http://gpu1:2020/v1",
        "http://gpu2:2020/v1",
        "http://gpu2:2021/v1",
        "http://gpu2:2022/v1",
        "http://10.0.0.7:8000/v1",
        "http://[::1]:9000/v1",
    ]
    deployment = config["model_list"][0]
    assert deployment["litellm_params"]["model"] == "openai/m"
    assert deployment["model_info"]["id"] == "m@http://gpu1:2020/v1", "each replica is its own deployment"
    router = config["router_settings"]
    assert router["routing_strategy"] == "least-busy" and router["num_retries"] == 2
    assert "fallbacks" not in router


def test_fallback_group_strategy_group_name_and_key():
    r = gen(
        "a",
        "--fallback",
        "b:7000",
        "--model",
        "m",
        "--group",
        "chat",
        "--strategy",
        "latency-based-routing",
        "--api-key-env",
        "LLMCHAT_KEY",
    )
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert bases(config, "chat") == ["http://a:2020/v1"]
    assert bases(config, "chat-fallback") == ["http://b:7000/v1"]
    assert config["router_settings"]["fallbacks"] == [{"chat": ["chat-fallback"]}]
    assert config["router_settings"]["routing_strategy"] == "latency-based-routing"
    assert {d["litellm_params"]["api_key"] for d in config["model_list"]} == {"os.environ/LLMCHAT_KEY"}


def test_a_replica_can_be_a_fallback_of_its_own_group_with_distinct_ids():
    config = json.loads(gen("a", "b", "--fallback", "a", "--model", "m").stdout)
    ids = [d["model_info"]["id"] for d in config["model_list"]]
    assert len(set(ids)) == len(ids) == 3
    assert config["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpu@x", "instances are N or N-M"),
        ("gpu@3-1", "instances are N or N-M"),
        ("gpu:http", "port must be a number"),
        (":2020", "no host"),
        ("gpu:2020@1", "not both"),
    ],
)
def test_bad_replicas_are_refused_with_the_reason(spec, message):
    r = gen(spec, "--model", "m")
    assert r.returncode == 2 and message in r.stderr and not r.stdout


def test_the_model_name_is_asked_from_the_first_replica_that_answers(tmp_path):
    seen = []

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's method name)
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"object": "list", "data": [{"id": "served-name", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # The first replica refuses connections (nothing listens on port 1); the second answers.
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bin/gen-litellm.py"),
                "127.0.0.1:1",
                f"127.0.0.1:{server.server_port}",
                "--api-key-env",
                "K",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "K": "secret"},
        )
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert {d["model_name"] for d in json.loads(r.stdout)["model_list"]} == {"served-name"}
    assert seen == [("/v1/models", "Bearer secret")]


def test_no_answering_replica_and_no_model_is_an_error():
    r = gen("127.0.0.1:1")
    assert r.returncode == 2 and "pass --model" in r.stderr
