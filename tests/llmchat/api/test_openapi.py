"""/openapi.json against what the routes send, without a model: every 200 names the official SDK's model of its
body (and the stream's event model), every reference resolves, and schemathesis's own response check passes
the scripted replies of each protocol, whole and streamed, and the error envelopes of every status, while it
fails bodies that break them (so the checks cannot pass vacuously)."""

import json

import pytest
import requests
import schemathesis
from anthropic.types import Message, MessageTokensCount
from jsonschema import Draft202012Validator
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from hrserve import ServiceError
from hrserve.errors import ERROR_STATUSES
from llmchat.api.anthropic_messages import DIALECT, MessageReply
from llmchat.api.common import dump
from llmchat.api.openai_chat import ChatReply
from llmchat.api.openai_completions import CompletionReply, CompletionRequest
from llmchat.api.openai_responses import ResponseReply
from llmchat.api.tokens import DetokenizeResponse, TokenizeResponse, VersionResponse
from llmchat.chat.events import Finish, Logprobs, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from llmchat.engine.sampling import TokenLogprob
from llmchat.server import create_app
from llmchat.settings import Settings
from tests.llmchat.api.scripted import MODEL, replay

# (method, path): the title of the 200's JSON schema (the SDK model's name) and the stream event's component.
SUCCESS = {
    ("post", "/v1/chat/completions"): (ChatCompletion.__name__, "ChatCompletionSSE"),
    ("post", "/v1/completions"): (Completion.__name__, "CompletionSSE"),
    ("post", "/v1/responses"): (Response.__name__, "ResponseSSE"),
    ("post", "/v1/messages"): (Message.__name__, "MessageSSE"),
    ("post", "/v1/messages/count_tokens"): (MessageTokensCount.__name__, None),
    ("get", "/v1/models"): ("SyncPage[Model]", None),
    ("get", "/v1/models/{model_id}"): (Model.__name__, None),
    ("post", "/tokenize"): (TokenizeResponse.__name__, None),
    ("post", "/detokenize"): (DetokenizeResponse.__name__, None),
    ("get", "/version"): (VersionResponse.__name__, None),
}
COMPLETION = {"model": MODEL, "prompt": "Hi", "logprobs": 2, "stream_options": {"include_usage": True}}
REPLIES = {
    "/v1/chat/completions": lambda: ChatReply(MODEL, True, True),
    "/v1/completions": lambda: CompletionReply(CompletionRequest.model_validate(COMPLETION), MODEL),
    "/v1/responses": lambda: ResponseReply(MODEL, {"parallel_tool_calls": True, "tool_choice": "auto", "tools": []}),
    "/v1/messages": lambda: MessageReply(MODEL),
}
LOGPROBS = Logprobs([TokenLogprob("Hi", -0.5, [("Hi", -0.5), ("Hey", -2.0)])])
CALL = [ToolCallStart(0, "call_1", "get_weather"), ToolCallDelta(0, '{"city":'), ToolCallDelta(0, '"Paris"}')]
# What the small model of the fuzz run rarely or never produces; legacy completions have no reasoning or tools.
SCRIPTS = {
    "text": [TextDelta("Hi"), LOGPROBS, TextDelta(" there"), Finish("stop", 7, 2)],
    "reasoning, cut at the length": [ReasoningDelta("Hm."), TextDelta("Hi"), LOGPROBS, Finish("length", 7, 2)],
    "tool call from cache": [TextDelta("Calling."), *CALL, Finish("tool_calls", 9, 6, cached_tokens=4)],
    "stop sequence": [TextDelta("Hi"), Finish("stop", 7, 1, stop_sequence="\n")],
}
PLAYS = [
    (path, script)
    for path in REPLIES
    for script in SCRIPTS
    if path != "/v1/completions" or script in ("text", "stop sequence")
]


@pytest.fixture(scope="module")
def doc() -> dict:
    return create_app(Settings(port=0)).openapi()


@pytest.fixture(scope="module")
def api(doc):
    return schemathesis.openapi.from_dict(doc)


def resolve(doc: dict, ref: str) -> dict:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def answer(status: int, content_type: str, body: bytes) -> schemathesis.Response:
    return schemathesis.Response(
        status, {"content-type": [content_type]}, body, requests.Request("POST", "http://llmchat").prepare(), 0, True
    )


def as_json(status: int, body: dict) -> schemathesis.Response:
    return answer(status, "application/json", json.dumps(body).encode())


def as_events(items: list[dict]) -> schemathesis.Response:
    text = "".join(
        (f"event: {item['event']}\n" if "event" in item else "") + f"data: {item['data']}\n\n" for item in items
    )
    return answer(200, "text/event-stream", text.encode())


@pytest.mark.parametrize(("method", "path"), SUCCESS)
def test_success_bodies_are_the_sdk_models(doc, method, path):
    body, event = SUCCESS[method, path]
    content = doc["paths"][path][method]["responses"]["200"]["content"]
    schema = resolve(doc, content["application/json"]["schema"]["$ref"])
    assert schema["title"] == body and schema["properties"] and schema["required"]
    if event is not None:
        assert content["text/event-stream"]["schema"] == {"$ref": f"#/components/schemas/{event}"}
        assert resolve(doc, content["text/event-stream"]["schema"]["$ref"])["properties"]["data"]


def test_health_documents_its_body(doc):
    responses = doc["paths"]["/health"]["get"]["responses"]
    for status in ("200", "503"):
        assert "status" in responses[status]["content"]["application/json"]["schema"]["required"]


def test_every_reference_resolves_to_a_valid_schema(doc):
    for ref in set(refs(doc)):
        Draft202012Validator.check_schema(resolve(doc, ref))


@pytest.mark.parametrize(("path", "script"), PLAYS)
def test_scripted_replies_match_the_documented_schemas(api, path, script):
    events, whole = replay(REPLIES[path], SCRIPTS[script])
    operation = api[path]["POST"]
    operation.validate_response(as_json(200, dump(whole)))
    operation.validate_response(as_events(events))


@pytest.mark.parametrize("path", REPLIES)
def test_errors_in_a_stream_match_the_documented_schemas(api, path):
    error = ServiceError(500, "Generation failed: boom", "server_error", "generation_error")
    api[path]["POST"].validate_response(as_events(REPLIES[path]().stream_error(error)))


@pytest.mark.parametrize("status", [int(status) for status in ERROR_STATUSES])
def test_error_bodies_match_the_documented_envelopes(api, status):
    error = ServiceError(status, "Refused.")
    api["/v1/chat/completions"]["POST"].validate_response(as_json(status, error.body()))
    api["/v1/messages"]["POST"].validate_response(as_json(status, error.body(DIALECT)))
    api["/tokenize"]["POST"].validate_response(as_json(status, error.body()))
    api["/detokenize"]["POST"].validate_response(as_json(status, error.body()))


@pytest.mark.parametrize("token_strs", [None, ["Hi", "Ġthere"]])
def test_tokenize_bodies_match_the_documented_schema(api, token_strs):
    body = {"count": 2, "max_model_len": 8192, "tokens": [1, 2], "token_strs": token_strs}
    api["/tokenize"]["POST"].validate_response(as_json(200, TokenizeResponse(**body).model_dump(mode="json")))
    assert not api["/tokenize"]["POST"].is_valid_response(as_json(200, body | {"tokens": ["1"]}))


def test_bodies_that_break_the_schemas_fail(api):
    operation = api["/v1/chat/completions"]["POST"]
    _, whole = replay(REPLIES["/v1/chat/completions"], SCRIPTS["text"])
    body = dump(whole)
    body["choices"][0]["message"]["role"] = "user"
    assert not operation.is_valid_response(as_json(200, body))
    assert not operation.is_valid_response(as_events([{"data": json.dumps({"object": "chat.completion.chunk"})}]))
    unknown = {"type": "error", "error": {"type": "teapot_error", "message": "Refused."}}
    assert not api["/v1/messages"]["POST"].is_valid_response(as_json(400, unknown))
