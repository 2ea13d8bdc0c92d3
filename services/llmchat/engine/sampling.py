"""Per-sequence sampling: parameters, next-token choice, and stop strings held back until they resolve."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmchat.engine.constraints import Constraint

# (completion token ids so far, next-token logits for this sequence) -> adjusted logits, applied to the
# sequence's own row after its grammar's mask.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


MIN_TEMPERATURE = 1e-3


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logits_processors: tuple[LogitsProcessor, ...] = ()
    constraint: Constraint | None = None  # the grammar its tokens must follow
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: off; N: the chosen token's log-probability and the N likeliest


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, masks or truncation),
    with the likeliest alternatives at that step."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


def token_logprob(logits: torch.Tensor, token_id: int, num_top: int, decode: Callable[[int], str]) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if num_top:
        values, ids = torch.topk(logprobs, num_top)
        top = [(decode(int(i)), float(v)) for v, i in zip(values, ids, strict=True)]
    return TokenLogprob(decode(token_id), float(logprobs[token_id]), top)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Picks the next token from one row of logits: greedy at temperature 0, else nucleus sampling."""
    # Below this, dividing by the temperature overflows float32 logits to inf (a subnormal 2e-308 did), and
    # the distribution is greedy in all but name anyway.
    if params.temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    logits = logits.float()
    if 0 < params.top_k < logits.numel():
        # Everything below the k-th largest logit is out (ties at the threshold stay).
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays (a top_p that
        # underflows to 0 in float32 would otherwise leave nothing to sample from).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class StopChecker:
    """Finds stop strings in streamed text without ever emitting any part of one.

    Text that could still grow into a stop string is held back; it is released as soon as it cannot,
    or by flush() when generation ends for another reason.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended generation

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += piece
        if not self.stop:
            text, self.pending = self.pending, ""
            return text, False
        hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            text, self.pending = self.pending[:at], ""
            return text, True
        keep = self._held_back()
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _held_back(self) -> int:
        """Length of the longest tail of pending that is a proper prefix of some stop string."""
        for n in range(min(len(self.pending), max(map(len, self.stop)) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
