"""Sampling and stop strings, which every request goes through."""

import random

import pytest
import torch

from llmchat.engine.sampling import SamplingParams, StopChecker, sample_next, token_logprob


def run(checker: StopChecker, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = checker.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + checker.flush(), False


CASES = [
    ("Hello world. The end.", ("The end",), "Hello world. ", True),
    ("no stop here", ("STOP",), "no stop here", False),
    ("a<|x|>b", ("<|x|>",), "a", True),
    ("first second", ("second", "first"), "", True),
    ("almost STO", ("STOP",), "almost STO", False),
    ("abcabd", ("abd",), "abc", True),
]


@pytest.mark.parametrize(("text", "stop", "expected", "stopped"), CASES)
@pytest.mark.parametrize("split", ["whole", "chars", "random"])
def test_stop_strings_any_chunking(text, stop, expected, stopped, split):
    if split == "whole":
        pieces = [text]
    elif split == "chars":
        pieces = list(text)
    else:
        rng = random.Random(7)
        cuts = sorted(rng.sample(range(1, len(text)), k=min(3, len(text) - 1)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(StopChecker(stop), pieces) == (expected, stopped)


def test_held_back_text_never_contains_stop_prefix_early():
    checker = StopChecker(("END",))
    assert checker.feed("abc E") == ("abc ", False)
    assert checker.feed("N") == ("", False)
    assert checker.feed("x") == ("ENx", False)


def test_greedy_and_top_p():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(max_tokens=1, temperature=0.0), gen) == 1
    # A tiny top_p keeps only the most likely token, whatever the seed.
    picks = {sample_next(logits, SamplingParams(max_tokens=1, top_p=0.01), gen) for _ in range(50)}
    assert picks == {1}
    picks = {sample_next(logits, SamplingParams(max_tokens=1, temperature=1.0), gen) for _ in range(300)}
    assert {1, 2} <= picks


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-9])
def test_tiny_top_p_keeps_the_top_token(top_p):
    logits = torch.tensor([0.5, 3.0, 1.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
    assert all(sample_next(logits, params, torch.Generator().manual_seed(n)) == 1 for n in range(5))


def test_top_k_keeps_only_the_k_likeliest():
    logits = torch.tensor([2.0, 1.9, 1.8, -5.0, 1.7])
    params = SamplingParams(max_tokens=1, temperature=2.0, top_k=2)
    picks = {sample_next(logits, params, torch.Generator().manual_seed(n)) for n in range(200)}
    assert picks == {0, 1}
    assert (
        len(
            {
                sample_next(logits, SamplingParams(max_tokens=1, temperature=2.0), torch.Generator().manual_seed(n))
                for n in range(200)
            }
        )
        >= 3
    ), "without top_k the others are sampled too"


def test_the_stop_string_that_matched_is_named():
    checker = StopChecker(("END", "STOP"))
    assert checker.matched is None
    assert run(checker, ["go S", "TOP then END"]) == ("go ", True)
    assert checker.matched == "STOP"


def test_token_logprob_is_the_models_log_probability_with_the_top_alternatives():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    entry = token_logprob(logits, 2, 2, lambda i: f"t{i}")
    expected = torch.log_softmax(logits, -1)
    assert entry.token == "t2" and entry.logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in entry.top] == ["t1", "t2"]
    assert entry.top[0][1] == pytest.approx(float(expected[1]))
    assert token_logprob(logits, 0, 0, str).top == []


@pytest.mark.parametrize("temperature", [2.2e-308, 1e-45, 1e-6])
def test_vanishing_temperature_is_greedy_not_an_overflow(temperature):
    logits = torch.tensor([0.5, 30.0, 29.0, -3.0])
    params = SamplingParams(max_tokens=1, temperature=temperature)
    assert all(sample_next(logits, params, torch.Generator().manual_seed(n)) == 1 for n in range(5))
