"""Sampling and stop strings, which every request goes through."""

import random

import pytest
import torch

from llmchat.sampling import SamplingParams, StopChecker, sample_next


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
