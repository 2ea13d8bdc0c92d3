"""One smoke pass over every HTTP endpoint the service exposes, against the real server and model.

The table must name every route the app serves: a new endpoint without a smoke case fails here.
(/metrics serves what this process's metric readers hold: the tests' own set-up has no Prometheus reader, so
tests/llmchat/e2e/test_otlp_export.py checks its content on a server of its own.)
"""

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Say hi."}]
# (method, path as routed, concrete path, JSON body, expected status, a check of the JSON reply)
CASES = [
    ("GET", "/health", "/health", None, 200, lambda j: j["status"] == "ok"),
    ("GET", "/openapi.json", "/openapi.json", None, 200, lambda j: "/v1/chat/completions" in j["paths"]),
    ("GET", "/docs", "/docs", None, 200, None),
    ("GET", "/docs/oauth2-redirect", "/docs/oauth2-redirect", None, 200, None),
    ("GET", "/redoc", "/redoc", None, 200, None),
    ("GET", "/metrics", "/metrics", None, 200, None),
    ("GET", "/version", "/version", None, 200, lambda j: j["version"]),
    (
        "POST",
        "/tokenize",
        "/tokenize",
        {"model": MODEL, "messages": HI},
        200,
        lambda j: j["count"] == len(j["tokens"]) > 0 and j["max_model_len"] > j["count"],
    ),
    ("POST", "/detokenize", "/detokenize", {"model": MODEL, "tokens": [19556, 905]}, 200, lambda j: j["prompt"]),
    ("GET", "/v1/models", "/v1/models", None, 200, lambda j: j["data"][0]["id"] == MODEL),
    ("GET", "/v1/models/{model_id:path}", f"/v1/models/{MODEL}", None, 200, lambda j: j["id"] == MODEL),
    (
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"model": MODEL, "messages": HI, "max_tokens": 4},
        200,
        lambda j: j["object"] == "chat.completion",
    ),
    (
        "POST",
        "/v1/completions",
        "/v1/completions",
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4},
        200,
        lambda j: j["object"] == "text_completion" and j["choices"][0]["text"],
    ),
    (
        "POST",
        "/v1/messages",
        "/v1/messages",
        {"model": MODEL, "messages": HI, "max_tokens": 4},
        200,
        lambda j: j["type"] == "message" and j["content"],
    ),
    (
        "POST",
        "/v1/messages/count_tokens",
        "/v1/messages/count_tokens",
        {"model": MODEL, "messages": HI},
        200,
        lambda j: j["input_tokens"] > 0,
    ),
    (
        "POST",
        "/v1/responses",
        "/v1/responses",
        {"model": MODEL, "input": "Say hi.", "max_output_tokens": 4},
        200,
        lambda j: j["object"] == "response" and j["output"],
    ),
    ("GET", "/v1/responses/{response_id}", "/v1/responses/resp_1", None, 404, lambda j: "stateless" in str(j)),
    ("DELETE", "/v1/responses/{response_id}", "/v1/responses/resp_1", None, 404, lambda j: "stateless" in str(j)),
    (
        "GET",
        "/v1/responses/{response_id}/input_items",
        "/v1/responses/resp_1/input_items",
        None,
        404,
        lambda j: "stateless" in str(j),
    ),
    (
        "POST",
        "/v1/responses/{response_id}/cancel",
        "/v1/responses/resp_1/cancel",
        None,
        400,
        lambda j: "stateless" in str(j),
    ),
]


def served_routes(routes) -> set[tuple[str, str]]:
    served = set()
    for route in routes:
        if hasattr(route, "original_router"):  # an included APIRouter
            served |= served_routes(route.original_router.routes)
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                served.add((method, route.path))
    return served


def test_the_table_covers_every_route(live):
    assert served_routes(live.app.routes) == {(method, routed) for method, routed, *_ in CASES}


@pytest.mark.parametrize(
    ("method", "routed", "path", "body", "status", "check"), CASES, ids=[f"{c[0]} {c[2]}" for c in CASES]
)
def test_endpoint_answers(live, method, routed, path, body, status, check):
    r = httpx.request(method, f"{live.base_url}{path}", json=body, timeout=120)
    assert r.status_code == status, r.text
    if check is not None:
        assert check(r.json()), r.text
