"""Sampling and output parameters through the official OpenAI SDK against the live server (bundled model):
logit_bias, penalties, min_tokens, ignore_eos, stop_token_ids, structured outputs, and n choices."""

import json
import re

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
STORY = [{"role": "user", "content": "Write a long story about a cat and a dog who become friends."}]


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(live):
    return live.app.state.runtime.engine.tokenizer


def chat(client, messages=STORY, **fields):
    extra = {k: fields.pop(k) for k in list(fields) if k not in ("max_tokens", "temperature", "seed", "n")}
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=fields.pop("max_tokens", 24), extra_body=extra or None, **fields
    )


def tokens(response, choice: int = 0) -> list[str]:
    return [t.token for t in response.choices[choice].logprobs.content]


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one(client, tokenizer):
    plain = chat(client, temperature=0, logprobs=True, max_tokens=6)
    first = tokens(plain)[0]
    banned = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == first]
    assert banned
    biased = chat(client, temperature=0, logprobs=True, max_tokens=6, logit_bias={str(i): -100 for i in banned})
    assert tokens(biased)[0] != first

    forced = tokenizer.encode(" the", add_special_tokens=False)[0]
    out = chat(client, temperature=0, max_tokens=5, logit_bias={str(forced): 100})
    assert out.choices[0].message.content == tokenizer.decode([forced] * 5)


def repeats(response) -> int:
    seen = tokens(response)
    return len(seen) - len(set(seen))


@pytest.mark.parametrize(
    "penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.8}]
)
def test_a_penalty_lowers_repeats_against_the_same_seed(client, penalty):
    same = {"temperature": 0.7, "seed": 11, "logprobs": True, "max_tokens": 60}
    free = chat(client, **same)
    penalized = chat(client, **same, **penalty)
    assert repeats(penalized) < repeats(free)


def test_min_tokens_holds_back_the_end_and_ignore_eos_runs_to_max_tokens(client):
    short = [{"role": "user", "content": "Say hi."}]
    plain = chat(client, short, temperature=0, max_tokens=60)
    ended = plain.usage.completion_tokens
    assert plain.choices[0].finish_reason == "stop" and ended < 40
    held = chat(client, short, temperature=0, max_tokens=60, min_tokens=ended + 15)
    assert held.usage.completion_tokens >= ended + 15
    endless = chat(client, short, temperature=0, max_tokens=40, ignore_eos=True)
    assert (endless.usage.completion_tokens, endless.choices[0].finish_reason) == (40, "length")


def test_stop_token_ids_end_the_output_and_include_stop_str_keeps_the_stop(client, tokenizer):
    plain = chat(client, temperature=0, logprobs=True, max_tokens=12)
    third = tokens(plain)[2]
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == third]
    cut = chat(client, temperature=0, max_tokens=12, stop_token_ids=ids)
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == 2
    text = plain.choices[0].message.content
    stop = text.split()[2]
    kept = chat(client, temperature=0, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert kept.choices[0].message.content.endswith(stop)


def test_allowed_token_ids_and_bad_words(client, tokenizer):
    pieces = [" cat", " dog"]
    ids = [tokenizer.encode(p, add_special_tokens=False)[0] for p in pieces]
    out = chat(client, temperature=1.0, seed=2, max_tokens=6, allowed_token_ids=ids, ignore_eos=True)
    assert re.fullmatch("((cat|dog) ?)+", out.choices[0].message.content.strip())

    plain = chat(client, temperature=0, max_tokens=12).choices[0].message.content
    word = max(plain.split(), key=len).strip(".,!?")
    banned = chat(client, temperature=0, max_tokens=12, bad_words=[word]).choices[0].message.content
    assert word in plain and word not in banned


@pytest.mark.parametrize(
    "fields",
    [
        {"guided_regex": r"[0-9]{3}-[0-9]{4}"},
        {"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}},
    ],
)
def test_regex_output_matches(client, fields):
    out = chat(client, [{"role": "user", "content": "Give me a phone number."}], max_tokens=20, **fields)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out.choices[0].message.content)


def test_choice_and_grammar_outputs_are_one_of_their_options(client):
    ask = [{"role": "user", "content": "Is the sky blue?"}]
    for fields in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        assert chat(client, ask, **fields).choices[0].message.content in ("yes", "no")
    grammar = 'root ::= "It is " ("blue" | "grey") "."'
    assert chat(client, ask, guided_grammar=grammar).choices[0].message.content in ("It is blue.", "It is grey.")
    lark = 'start: "colour: " /[a-z]+/'
    out = chat(client, ask, structured_outputs={"grammar": lark}, max_tokens=10)
    assert re.fullmatch("colour: [a-z]+", out.choices[0].message.content)


def test_guided_json_and_completions_structured_outputs(client):
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    out = chat(client, [{"role": "user", "content": "How old is the cat?"}], guided_json=schema, max_tokens=20)
    assert isinstance(json.loads(out.choices[0].message.content)["age"], int)
    done = client.completions.create(
        model=MODEL, prompt="The answer is", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert done.choices[0].text in ("yes", "no")


def prefilled(live) -> int:
    return httpx.get(f"{live.base_url}/health").json()["decoding"]["prefilled_tokens"]


def test_n_choices_share_one_prefill_and_stream_agrees_with_whole(client, live):
    ask = [{"role": "user", "content": "Name a colour and say why you like it (n test)."}]
    before = prefilled(live)
    whole = chat(client, ask, n=3, temperature=1.0, seed=5, max_tokens=12)
    computed = prefilled(live) - before
    cached = whole.usage.prompt_tokens_details.cached_tokens
    assert computed == whole.usage.prompt_tokens - cached  # the prompt once, not three times
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # seed + i per choice
    again = chat(client, ask, n=3, temperature=1.0, seed=5, max_tokens=12)
    assert [c.message.content for c in again.choices] == texts

    streamed = {i: "" for i in range(3)}
    reasons = {}
    usage = None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask,
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert [streamed[i] for i in range(3)] == texts
    assert reasons == {i: c.finish_reason for i, c in enumerate(whole.choices)}
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_n_completions_count_the_prompt_once(client):
    out = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, n=2, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == out.choices[1].text  # greedy choices agree
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 12)


def test_n_with_required_tool_calls_gives_each_choice_a_call(client):
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[tool],
        tool_choice="required",
        n=2,
        # Sampled, an argument may run on (the grammar bounds its form, not its length): room to end, on any CPU.
        temperature=0.7,
        seed=3,
        max_tokens=200,
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert "city" in json.loads(call.function.arguments)
