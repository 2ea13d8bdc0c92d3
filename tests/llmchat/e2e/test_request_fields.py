"""No silent drops: every create parameter of the official OpenAI SDK's chat and completions, and every extra
vLLM documents for them, is honored (a behaviour test names it), refused with a 400 naming it, or changes
nothing and is accepted. Out-of-range values are 400s in each protocol's envelope, through the SDKs."""

import importlib

import anthropic
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from llmchat.api.sampling_fields import IGNORED, UNSUPPORTED

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]

# vLLM's documented extras ("Extra parameters" of its OpenAI-compatible server, chat and completions).
VLLM_SAMPLING = [
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "structured_outputs",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag", "guided_decoding_backend",
    "guided_whitespace_pattern", "priority", "request_id", "logits_processors", "return_tokens_as_token_ids",
    "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs", "add_special_tokens",
]  # fmt: skip
VLLM_CHAT = [
    "echo", "add_generation_prompt", "continue_final_message", "documents", "chat_template", "chat_template_kwargs",
    "mm_processor_kwargs",
]  # fmt: skip
VLLM_COMPLETIONS = ["prompt_embeds", "response_format"]

E2E = "tests.llmchat.e2e"
SAMPLING = f"{E2E}.test_sampling_params"
# Each honored field -> the test (module, function) that shows it changes the output as documented.
HONORED = {
    "messages": (f"{E2E}.test_openai_api", "test_non_streaming_answers_with_usage"),
    "model": (f"{E2E}.test_openai_api", "test_unknown_model_is_404"),
    "max_tokens": (f"{E2E}.test_openai_api", "test_max_tokens_gives_length"),
    "max_completion_tokens": ("tests.llmchat.api.test_openai_chat_adapter", "test_request_maps_to_the_chat_core"),
    "temperature": ("tests.llmchat.engine.test_sampling", "test_greedy_and_top_p"),
    "top_p": ("tests.llmchat.engine.test_sampling", "test_greedy_and_top_p"),
    "stop": (f"{E2E}.test_openai_api", "test_stop_string_cuts_output"),
    "seed": (f"{E2E}.test_openai_api", "test_seed_makes_sampling_repeatable"),
    "stream": (f"{E2E}.test_openai_api", "test_streaming_sdk_matches_non_streaming"),
    "stream_options": (f"{E2E}.test_completions", "test_stream_without_include_usage_sends_none"),
    "tools": (f"{E2E}.test_tools_api", "test_enforced_choice_gives_one_valid_call"),
    "tool_choice": (f"{E2E}.test_tools_api", "test_tool_choice_none_leaves_tools_out"),
    "parallel_tool_calls": ("tests.llmchat.chat.test_reasoning", "test_required_tool_call_is_not_taken_for_reasoning"),
    "response_format": (f"{E2E}.test_tools_api", "test_json_schema_response_validates"),
    "logprobs": (f"{E2E}.test_logprobs", "test_chat_logprobs_cover_the_content_streamed_or_not"),
    "top_logprobs": (f"{E2E}.test_logprobs", "test_chat_logprobs_cover_the_content_streamed_or_not"),
    "reasoning_effort": ("tests.llmchat.chat.test_reasoning", "test_reasoning_effort_reaches_the_template"),
    "chat_template_kwargs": (
        "tests.llmchat.chat.test_reasoning",
        "test_thinking_off_by_template_kwargs_gives_an_answer",
    ),
    "n": (SAMPLING, "test_n_choices_share_one_prefill_and_stream_agrees_with_whole"),
    "best_of": (SAMPLING, "test_n_completions_count_the_prompt_once"),
    "logit_bias": (SAMPLING, "test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one"),
    "presence_penalty": (SAMPLING, "test_a_penalty_lowers_repeats_against_the_same_seed"),
    "frequency_penalty": (SAMPLING, "test_a_penalty_lowers_repeats_against_the_same_seed"),
    "repetition_penalty": (SAMPLING, "test_a_penalty_lowers_repeats_against_the_same_seed"),
    "top_k": (f"{E2E}.test_anthropic", "test_top_k_reaches_the_sampler"),
    "min_p": ("tests.llmchat.engine.test_penalties", "test_min_p_drops_tokens_far_below_the_likeliest"),
    "min_tokens": (SAMPLING, "test_min_tokens_holds_back_the_end_and_ignore_eos_runs_to_max_tokens"),
    "ignore_eos": (SAMPLING, "test_min_tokens_holds_back_the_end_and_ignore_eos_runs_to_max_tokens"),
    "stop_token_ids": (SAMPLING, "test_stop_token_ids_end_the_output_and_include_stop_str_keeps_the_stop"),
    "include_stop_str_in_output": (SAMPLING, "test_stop_token_ids_end_the_output_and_include_stop_str_keeps_the_stop"),
    "allowed_token_ids": (SAMPLING, "test_allowed_token_ids_and_bad_words"),
    "bad_words": (SAMPLING, "test_allowed_token_ids_and_bad_words"),
    "skip_special_tokens": ("tests.llmchat.e2e.test_request_fields", "test_skip_special_tokens_false_shows_them"),
    "structured_outputs": (SAMPLING, "test_regex_output_matches"),
    "guided_json": (SAMPLING, "test_guided_json_and_completions_structured_outputs"),
    "guided_regex": (SAMPLING, "test_regex_output_matches"),
    "guided_choice": (SAMPLING, "test_choice_and_grammar_outputs_are_one_of_their_options"),
    "guided_grammar": (SAMPLING, "test_choice_and_grammar_outputs_are_one_of_their_options"),
    "prompt": (f"{E2E}.test_completions", "test_default_max_tokens_is_16"),
    "echo": (f"{E2E}.test_completions", "test_echo_puts_the_prompt_first"),
    "suffix": (f"{E2E}.test_request_fields", "test_suffix_is_refused"),
}
# A value that would change the output, for each refused field (anything but the values that change nothing).
REFUSED_VALUES = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "moderation": {"mode": "block"},
    "verbosity": "low",
    "web_search_options": {},
    "use_beam_search": True,
    "length_penalty": 0.5,
    "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 5,
    "prompt_logprobs": 1,
    "prompt_embeds": "AAAA",
    "add_special_tokens": True,
    "continue_final_message": True,
    "add_generation_prompt": False,
    "documents": [{"text": "x"}],
    "chat_template": "{{ messages }}",
    "mm_processor_kwargs": {"a": 1},
    "structural_tag": "{}",
    "guided_whitespace_pattern": " ",
    "logits_processors": ["x"],
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "kv_transfer_params": {"a": 1},
    "vllm_xargs": {"a": 1},
}
CHAT_FIELDS = sorted(
    {*chat_create_params.CompletionCreateParamsBase.__annotations__, "stream", *VLLM_SAMPLING, *VLLM_CHAT}
)
COMPLETION_FIELDS = sorted(
    {*completion_create_params.CompletionCreateParamsBase.__annotations__, "stream", *VLLM_SAMPLING, *VLLM_COMPLETIONS}
)
CHAT_ONLY_REFUSED = {"echo"}  # vLLM's chat echo repeats the last message; completions' echo is honored


def test_every_field_is_honored_refused_or_harmless():
    unclassified = [
        f for f in {*CHAT_FIELDS, *COMPLETION_FIELDS} if f not in HONORED and f not in UNSUPPORTED and f not in IGNORED
    ]
    assert not unclassified, f"fields with no decision: {sorted(unclassified)}"
    for field, (module, name) in HONORED.items():
        assert callable(getattr(importlib.import_module(module), name, None)), f"{field}: {module}.{name} is missing"


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def refused_param(call) -> str | None:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    return caught.value.body.get("param")


@pytest.mark.parametrize("field", sorted(set(CHAT_FIELDS) & set(REFUSED_VALUES) | CHAT_ONLY_REFUSED))
def test_fields_that_would_change_the_output_are_refused_by_name(client, field):
    value = True if field == "echo" else REFUSED_VALUES[field]
    extra = {field: value}
    if field in chat_create_params.CompletionCreateParamsBase.__annotations__:
        param = refused_param(lambda: client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, **extra))
    else:
        param = refused_param(
            lambda: client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, extra_body=extra)
        )
    assert param == field
    if field in COMPLETION_FIELDS and field != "echo":
        param = refused_param(
            lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body=extra)
        )
        assert param == field


def test_suffix_is_refused(client):
    assert refused_param(lambda: client.completions.create(model=MODEL, prompt="Hi", suffix="!")) == "suffix"


@pytest.mark.parametrize("field", sorted(IGNORED & {*CHAT_FIELDS, *COMPLETION_FIELDS}))
def test_fields_that_change_nothing_are_accepted(client, field):
    extra = {field: "x" if field != "metadata" else {"k": "v"}}
    out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, extra_body=extra)
    assert out.choices[0].message.content is not None


def test_skip_special_tokens_false_shows_them(client):
    kept = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=3, temperature=0, extra_body={"logit_bias": {"2": 100}, "ignore_eos": True}
    )
    shown = client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=3,
        temperature=0,
        extra_body={"logit_bias": {"2": 100}, "ignore_eos": True, "skip_special_tokens": False},
    )
    assert kept.choices[0].text == ""  # token 2 is SmolLM2's <|im_end|>, a special token
    assert shown.choices[0].text == "<|im_end|>" * 3


BAD = [
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"logit_bias": {"cat": 5}}, "logit_bias.cat"),
    ({"logit_bias": {"1000000000": 5}}, "logit_bias.1000000000"),
    ({"logit_bias": {"5": 300}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"regex": "["}}, "structured_outputs.regex"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words.0"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[p for _, p in BAD])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_out_of_range_values_are_400_naming_the_field(client, fields, param, route):
    if route == "chat":
        call = lambda: client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, extra_body=fields)  # noqa: E731
    else:
        call = lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body=fields)  # noqa: E731
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_anthropic_top_k_out_of_range_is_400_in_its_envelope(live):
    client = anthropic.Anthropic(base_url=live.base_url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=1, messages=HI, extra_body={"top_k": -1})
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
