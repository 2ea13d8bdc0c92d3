"""Per-sequence sampling: parameters, next-token choice, and stop strings held back until they resolve."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmchat.engine.constraints import Constraint
from llmchat.engine.gpu import on_device

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


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], num_tops: list[int], decode: Callable[[int], str]
) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its `num_tops` likeliest tokens, read back from the
    device once for all rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, on_device(tokens, logits.device)[:, None])[:, 0]
    values, ids = torch.topk(logprobs, max(num_tops))  # k=0 gives empty rows
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    return [
        TokenLogprob(decode(token), chosen[i], [(decode(t), v) for t, v in zip(ids[i][:n], values[i][:n], strict=True)])
        for i, (token, n) in enumerate(zip(tokens, num_tops, strict=True))
    ]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[list[int], list[bool]]:
    """Every row's next token, sampled together on the logits' device and read back once; and which rows'
    logits hold NaN or +inf (their token means nothing; the caller ends those requests).

    Greedy rows (temperature ~0) take the argmax. The others apply their own top-k, temperature and top-p,
    then draw by the exponential race: argmax(p / E) with E ~ Exp(1) from the row's own generator picks
    token i with probability p_i, and, unlike torch.multinomial, does not assert on the device when a row
    is NaN (which on CUDA would kill the process's context).
    """
    tokens = logits.argmax(dim=-1)
    broken = (logits.isnan() | logits.isposinf()).any(dim=-1)
    drawn = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if drawn:
        index = on_device(drawn, logits.device)
        tokens[index] = _draw(logits[index].float(), [params[i] for i in drawn], [generators[i] for i in drawn])
    tokens, broken = torch.stack([tokens, broken.long()]).tolist()
    return tokens, [bool(b) for b in broken]


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    rows, vocab = logits.shape
    device = logits.device
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(ks) < vocab:
        # Everything below a row's k-th largest logit is out (ties at the threshold stay).
        top = torch.topk(logits, max(ks)).values
        threshold = top.gather(1, on_device(ks, device)[:, None] - 1)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    temperature = on_device([p.temperature for p in params], device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    top_p = [p.top_p for p in params]
    if min(top_p) < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays (a top_p that
        # underflows to 0 in float32 would otherwise leave nothing to sample from).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= on_device(top_p, device)[:, None]
        outside[:, 0] = False
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1)


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
