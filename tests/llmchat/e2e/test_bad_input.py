"""Bad input against the real server: each case gets its 4xx in the OpenAI envelope (with `param` where one
applies), and the next good request still succeeds."""

import json

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}


def body(**change) -> bytes:
    return json.dumps(GOOD | change).encode()


# (case id, raw body, expected status, expected param, expected code)
CASES = [
    ("malformed json", b'{"model": ', 400, None, None),
    ("not an object", b"[1, 2, 3]", 400, None, None),
    ("a bare string", b'"hello"', 400, None, None),
    ("non-utf8", b'{"model": "\xff\xfe", "messages": []}', 400, None, None),
    ("deep nesting", b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, None),
    ("wrong type", body(max_tokens="ten"), 400, "max_tokens", None),
    ("empty messages", body(messages=[]), 400, "messages", None),
    ("unknown role", body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", None),
    (
        "unknown content part",
        body(messages=[{"role": "user", "content": [{"type": "video", "video": "x"}]}]),
        400,
        "messages.0.content",
        None,
    ),
    ("tool message without id", body(messages=[{"role": "tool", "content": "18"}]), 400, "messages.0", None),
    (
        "tool call args not json",
        body(messages=[{"role": "assistant", "tool_calls": [CALL]}]),
        400,
        "messages.0.tool_calls.0.function.arguments",
        None,
    ),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens over context", body(max_tokens=1_000_000), 400, "max_tokens", "context_length_exceeded"),
    ("temperature too high", body(temperature=2.5), 400, "temperature", None),
    ("top_p zero", body(top_p=0), 400, "top_p", None),
    ("five stop strings", body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("n over the limit", body(n=17), 400, "n", None),
    ("seed out of range", body(seed=2**64), 400, "seed", None),
    ("unknown model", body(model="gpt-9"), 404, "model", "model_not_found"),
    ("tool without function", body(tools=[{"type": "function"}]), 400, "tools.0.function", None),
    ("tool of unknown type", body(tools=[{"type": "retrieval", "function": {"name": "f"}}]), 400, "tools.0.type", None),
    (
        "tool_choice names no offered tool",
        body(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "tool_choice",
        None,
    ),
    (
        "body over the size limit",
        body(messages=[{"role": "user", "content": "x" * (9 * 2**20)}]),
        413,
        None,
        "request_too_large",
    ),
]


@pytest.mark.parametrize(("raw", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_body_gets_its_4xx_and_the_server_keeps_serving(live, raw, status, param, code):
    url = f"{live.base_url}/v1/chat/completions"
    r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    if code:
        assert error["code"] == code
    assert "Traceback" not in r.text
    assert httpx.post(url, json=GOOD, timeout=60).status_code == 200


@pytest.mark.parametrize("job_id", ["a\nb", "x" * 200, "job id", "\x01\x02", "../../etc/passwd"])
def test_hostile_client_job_id_is_400(live, job_id):
    url = f"{live.base_url}/v1/chat/completions"
    r = httpx.post(url, params={"client_job_id": job_id}, json=GOOD, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_client_job_id"
    assert httpx.post(url, json=GOOD, timeout=60).status_code == 200
