"""The legacy completions adapter without a server: scripted chat events streamed as text_completion chunks
that add up to the whole response (echo first, finish_reason last, usage if asked, then [DONE]), per-chunk
log-probabilities, and the request mapping's refusals."""

import json

import pytest

from llmchat.api.common import DONE
from llmchat.api.openai_completions import CompletionReply, CompletionRequest, to_chat_request
from llmchat.chat import ChatError
from llmchat.chat.events import Finish, Logprobs, TextDelta
from llmchat.engine.sampling import TokenLogprob
from tests.llmchat.api.scripted import MODEL, replay


def request(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "The capital of France is"} | fields)


def play(body: CompletionRequest, chat_events):
    sse, whole = replay(lambda: CompletionReply(body, MODEL), chat_events)
    assert sse[-1] == {"data": DONE}
    return [json.loads(item["data"]) for item in sse[:-1]], whole


def logprobs(token: str) -> Logprobs:
    return Logprobs([TokenLogprob(token, -0.25, [(token, -0.25)])])


def test_chunks_add_up_to_the_whole_completion():
    body = request(echo=True, stream_options={"include_usage": True})
    chunks, whole = play(body, [TextDelta(" Paris"), TextDelta("."), Finish("stop", 6, 2, cached_tokens=3)])
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert texts == ["The capital of France is", " Paris", ".", ""]
    assert "".join(texts) == whole.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, None, "stop"]
    assert whole.choices[0].finish_reason == "stop"
    # usage: null on every chunk but the last, which carries the whole response's usage and no choices.
    assert [c["usage"] for c in chunks[:-1]] == [None] * 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(
        mode="json", exclude_unset=True
    )
    assert whole.usage.prompt_tokens_details.cached_tokens == 3


def test_without_include_usage_no_chunk_mentions_usage():
    chunks, whole = play(request(), [TextDelta(" Paris"), Finish("length", 6, 1)])
    assert not any("usage" in c for c in chunks)
    assert whole.usage.total_tokens == 7 and whole.choices[0].finish_reason == "length"


def test_each_chunk_carries_the_logprobs_of_its_own_tokens():
    body = request(logprobs=1)
    chunks, whole = play(
        body, [logprobs(" Par"), logprobs("is"), TextDelta(" Paris"), logprobs("."), Finish("stop", 6, 3)]
    )
    per_chunk = [c["choices"][0]["logprobs"]["tokens"] for c in chunks]
    assert per_chunk == [[" Par", "is"], ["."]]
    assert whole.choices[0].logprobs.tokens == [" Par", "is", "."]
    assert whole.choices[0].logprobs.text_offset == [0, 4, 6]
    assert whole.choices[0].logprobs.top_logprobs[0] == {" Par": -0.25}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2, "best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "logprobs"),
        ({"suffix": "!"}, "suffix"),
        ({"logit_bias": {"the": 1.0}}, "logit_bias.the"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"guided_regex": "("}, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_what_cannot_be_served_is_refused_at_the_field(fields, param):
    with pytest.raises(ChatError) as exc:
        to_chat_request(request(**fields))
    assert exc.value.param == param


def test_a_one_item_prompt_list_is_its_text():
    chat = to_chat_request(request(prompt=["Hello"], stop=["\n"], max_tokens=5))
    assert (chat.prompt, chat.stop, chat.max_tokens, chat.messages) == ("Hello", ("\n",), 5, [])
