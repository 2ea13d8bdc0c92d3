"""Per-sequence sampling parameters, and stop strings held back until they resolve (sampler.py samples)."""

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
    """How one sequence picks its tokens. The penalties and the bias change the logits before a grammar's mask
    (so a mask always wins); top_k, temperature, min_p and top_p then shape what is drawn from."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off; drops tokens less likely than min_p times the likeliest one
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop: bool = False  # the stop string that ended the output is part of its text
    # OpenAI's: subtracted once per time a token was generated (frequency), once if it was (presence).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # transformers' and vLLM's: a token seen in the prompt or the output has its logit divided by it (if
    # positive, else multiplied); 1: off.
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # the end of sequence and stop_token_ids are held back until this many tokens
    ignore_eos: bool = False  # the model's end of sequence does not end the output
    stop_token_ids: frozenset[int] = frozenset()  # more tokens that end the output, as its end of sequence does
    allowed_token_ids: tuple[int, ...] = ()  # (): any; else only these may be generated
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never completed: each one's last is banned
    logits_processors: tuple[LogitsProcessor, ...] = ()
    constraint: Constraint | None = None  # the grammar its tokens must follow
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: off; N: the chosen token's log-probability and the N likeliest

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, masks or truncation),
    with the likeliest alternatives at that step."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


class StopChecker:
    """Finds stop strings in streamed text without ever emitting any part of one.

    Text that could still grow into a stop string is held back; it is released as soon as it cannot,
    or by flush() when generation ends for another reason.
    """

    def __init__(self, stop: tuple[str, ...], include: bool = False) -> None:
        """`include`: the stop string that matched ends the emitted text rather than being cut from it."""
        self.stop = tuple(s for s in stop if s)
        self.include = include
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended generation

    def feed(self, piece: str, armed: bool = True) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached). Unarmed (before min_tokens), no stop
        string is looked for and nothing is held back."""
        self.pending += piece
        if not self.stop or not armed:
            text, self.pending = self.pending, ""
            return text, False
        hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            end = at + len(self.matched) if self.include else at
            text, self.pending = self.pending[:end], ""
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
