"""Schemathesis against llmchat's own /openapi.json: no 5xx, no response that breaks the documented
schema (200s included: whole bodies against the official SDK's models, streams event by event), and a
healthy server afterwards. CI runs a bounded number of cases; `just fuzz` runs more."""

import os
import sys
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
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
    "POST /tokenize",
    "POST /detokenize",
    "GET /version",
]
# The operations whose fuzzed requests reach a 200 (the stored-response routes only ever refuse), each of
# which must have had JSON 200s checked against its documented schema, or the run proved nothing of them.
ANSWERING = [label for label in OPERATIONS if "{response_id}" not in label]
HI = [{"role": "user", "content": "Hi"}]
# One streamed request per generating route, and the same request unstreamed, run before the generated ones:
# random bodies rarely get past the request checks, and how many do depends on which of the project's modules
# are loaded (Hypothesis draws constants from their source), so each route's 200 body and stream are checked
# against the SDK's models whatever the generated cases turn out to be.
STREAMED = {
    "POST /v1/chat/completions": {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True},
    "POST /v1/completions": {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 4,
        "logprobs": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "POST /v1/messages": {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True},
    "POST /v1/responses": {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True},
}


# Both forms of the tokenizer's request, run before the generated ones, so each form's 200 (token strings
# included) is checked against the schema however few random bodies hold exactly one of prompt and messages.
TOKENIZE = [
    {"model": MODEL, "prompt": "Hi", "return_token_strs": True},
    {"model": MODEL, "messages": HI, "return_token_strs": True},
]


def documented_200(operation) -> dict[str, dict]:
    """The schema of each media type the operation's 200 documents, where it documents one."""
    method, path = operation.method.lower(), operation.path
    content = operation.schema.raw_schema["paths"][path][method]["responses"]["200"].get("content", {})
    return {media: entry["schema"] for media, entry in content.items() if entry.get("schema")}


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_never_errors_or_breaks_its_schema(fuzz_target, label):
    # Driven through hypothesis directly: schemathesis's pytest plugin does not load under this pytest.
    api = schemathesis.openapi.from_url(f"{fuzz_target.base_url}/openapi.json")
    operations = {op.label: op for op in (result.ok() for result in api.get_all_operations())}
    assert set(OPERATIONS) <= set(operations), sorted(operations)
    documented = documented_200(operations[label])
    if label in ANSWERING:
        assert "application/json" in documented, documented

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
        path = case.path_parameters or {}
        if len(path.get("model_id", "")) % 2:
            # Half the cases (by the name's length, so a case always gets the same) ask for the served model;
            # the rest keep fuzzing the path's decoding and the 404.
            path["model_id"] = MODEL
        response = case.call_and_validate(base_url=fuzz_target.base_url, timeout=120, checks=CHECKS)
        statuses[response.status_code] += 1
        media = response.headers.get("content-type", [""])[0].split(";")[0]
        if response.status_code == 200 and media in documented:
            # call_and_validate raised nothing, so response_schema_conformance passed this body.
            validated[media] += 1

    statuses: Counter[int] = Counter()
    validated: Counter[str] = Counter()
    if label in STREAMED:
        streamed = STREAMED[label]
        whole = {key: value for key, value in streamed.items() if key not in ("stream", "stream_options")}
        for body in (streamed, whole):
            run = example(case=operations[label].Case(body=body, media_type="application/json"))(run)
    for body in TOKENIZE if label == "POST /tokenize" else ():
        run = example(case=operations[label].Case(body=body, media_type="application/json"))(run)
    run()
    # The case counts per operation, for `just fuzz` (run with -s) to report.
    sys.stderr.write(
        f"\nfuzz {label}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}, "
        f"200s checked against their schema {dict(validated)}\n"
    )
    assert statuses
    if label in ANSWERING:
        assert validated["application/json"], statuses
    if label in STREAMED:
        assert validated["text/event-stream"], statuses


def test_server_is_healthy_after_fuzzing(fuzz_target):
    health = httpx.get(f"{fuzz_target.base_url}/health").json()
    assert health["status"] == "ok" and health["engine_alive"]
