"""Schemathesis against llmchat's own /openapi.json: no 5xx, no response that breaks the documented
schema, and a healthy server afterwards. CI runs a bounded number of cases; `just fuzz` runs more."""

import os
import sys
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import spawn_llmchat

MODEL = "SmolLM2-135M-Instruct"
EXAMPLES = int(os.environ.get("LLMCHAT_FUZZ_EXAMPLES", "30"))
# The suite's run is the same every time (a red CI names a reproducible case); `just fuzz` explores.
DERANDOMIZE = "LLMCHAT_FUZZ_EXAMPLES" not in os.environ
# What the API promises. Not "every schema-valid body is accepted": some rules span fields or depend on
# the model (a tool message needs tool_call_id; prompt plus max_tokens must fit the context).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    # A small context keeps every valid generation short, so many cases fit in the run.
    env = {"OTEL_SDK_DISABLED": "true", "LLMCHAT_MAX_CONTEXT": "80", "LLMCHAT_LOG_LEVEL": "warning"}
    server = spawn_llmchat(tmp_path_factory.mktemp("fuzz"), env)
    yield server
    assert server.stop() == 0


OPERATIONS = [
    "GET /health",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
    "POST /v1/responses",
    "GET /v1/responses/{response_id}",
    "POST /v1/responses/{response_id}/cancel",
]


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_never_errors_or_breaks_its_schema(fuzz_target, label):
    # Driven through hypothesis directly: schemathesis's pytest plugin does not load under this pytest.
    api = schemathesis.openapi.from_url(f"{fuzz_target.base_url}/openapi.json")
    operations = {op.label: op for op in (result.ok() for result in api.get_all_operations())}
    assert set(OPERATIONS) <= set(operations), sorted(operations)

    @given(case=operations[label].as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=DERANDOMIZE,
    )
    def run(case):
        if isinstance(case.body, dict) and "model" in case.body:
            # Random names only ever reach the 404; the served name takes the body on to the engine.
            case.body["model"] = MODEL
        response = case.call_and_validate(base_url=fuzz_target.base_url, timeout=120, checks=CHECKS)
        statuses[response.status_code] += 1

    statuses: Counter[int] = Counter()
    run()
    # The case count per operation, for `just fuzz` (run with -s) to report.
    sys.stderr.write(f"\nfuzz {label}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}\n")
    assert statuses


def test_server_is_healthy_after_fuzzing(fuzz_target):
    health = httpx.get(f"{fuzz_target.base_url}/health").json()
    assert health["status"] == "ok" and health["engine_alive"]
