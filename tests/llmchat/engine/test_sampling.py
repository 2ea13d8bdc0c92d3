"""Sampling and stop strings, which every request goes through."""

import random

import pytest
import torch

from llmchat.engine.sampler import sample, token_logprobs
from llmchat.engine.sampling import SamplingParams, StopChecker


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


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One row through the batched sampler."""
    tokens, broken = sample(logits[None].clone(), [params], [generator])
    assert broken == [False]
    return tokens[0]


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


def test_token_logprobs_are_the_models_log_probabilities_with_the_top_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    first, second = token_logprobs(logits, [2, 3], [2, 0], lambda i: f"t{i}")
    expected = torch.log_softmax(logits, -1)
    assert first.token == "t2" and first.logprob == pytest.approx(float(expected[0, 2]))
    assert [t for t, _ in first.top] == ["t1", "t2"]
    assert first.top[0][1] == pytest.approx(float(expected[0, 1]))
    assert second.token == "t3" and second.logprob == pytest.approx(float(expected[1, 3])) and second.top == []
    assert token_logprobs(logits[:1], [0], [0], str)[0].top == []


def test_a_batch_samples_each_row_as_alone_and_greedy_rows_take_the_argmax():
    """Rows with their own temperature, top-k, top-p and seed: each row's token is what it gets alone with
    the same seed, whatever the batch around it, and a seed repeats its draws."""
    torch.manual_seed(3)
    logits = torch.randn(6, 50) * 3
    params = [
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=0.7, seed=1),
        SamplingParams(max_tokens=1, temperature=1.3, top_k=5),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=2.0, top_k=3, top_p=0.9),
    ]

    def draws(seed: int) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
        together = [sample(logits.clone(), params, gens)[0] for _ in range(20)]
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
        alone = [
            [sample_next(logits[i], p, g) for i, (p, g) in enumerate(zip(params, gens, strict=True))] for _ in range(20)
        ]
        assert together == alone
        return together

    first = draws(7)
    assert first == draws(7)
    for row in (0, 4):
        assert {t[row] for t in first} == {int(logits[row].argmax())}
    assert len({t[1] for t in first}) > 1, "a sampled row varies from draw to draw"
    top3 = set(torch.topk(logits[5], 3).indices.tolist())
    assert {t[5] for t in first} <= top3


def test_the_exponential_race_draws_in_proportion_to_the_probabilities():
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(max_tokens=1, temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    picks = [sample_next(probs.log(), params, gen) for _ in range(3000)]
    shares = [picks.count(i) / len(picks) for i in range(3)]
    assert shares == pytest.approx([0.6, 0.3, 0.1], abs=0.03)


def test_a_nan_row_is_reported_and_does_not_disturb_the_others():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[0.0, 2.0, 1.0], [nan, 1.0, 0.0], [1.0, inf, 0.0], [3.0, 1.0, 0.0], [3.0, 1.0, nan], [-inf, -inf, -inf]]
    )
    params = [SamplingParams(max_tokens=1, temperature=t) for t in (0.0, 1.0, 1.0, 1.0, 0.0, 0.0)]
    gens = [torch.Generator().manual_seed(n) for n in range(len(params))]
    tokens, broken = sample(logits, params, gens)
    assert broken == [False, True, True, False, True, True]
    assert tokens[0] == 1 and 0 <= tokens[3] < 3


@pytest.mark.parametrize("temperature", [2.2e-308, 1e-45, 1e-6])
def test_vanishing_temperature_is_greedy_not_an_overflow(temperature):
    logits = torch.tensor([0.5, 30.0, 29.0, -3.0])
    params = SamplingParams(max_tokens=1, temperature=temperature)
    assert all(sample_next(logits, params, torch.Generator().manual_seed(n)) == 1 for n in range(5))
