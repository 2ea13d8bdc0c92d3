"""What decode steps and prompt chunks take, learnt from the steps the engine ran, to bound the next step's chunks."""

from llmchat.engine.scheduler import MIN_CHUNK

# How far one step moves an average: recent steps count most, so the bound follows a change of load within a
# few steps (a prompt's growing context, more rows decoding).
WEIGHT = 0.3


class StepCost:
    """Moving averages of a decode step's seconds and of a prompt token's seconds beyond it.

    Steps that prefilled fewer than MIN_CHUNK tokens are the rests of prompts, not chunks the bound cut, and are
    not counted. Mixing any chunk into a step costs something of its own (its past's attention, its row of
    logits), which a few tokens cannot spread: the 5-token rest of a prompt found in the prefix cache cost 3 ms a
    token beside 2.7k tokens of context, a 100-token chunk 0.6 ms. Counted, such rests kept the bound near 30
    tokens, and a 60-token agent turn took two steps where one fitted (2-core AMX host).
    """

    def __init__(self) -> None:
        self.decode_step_s: float | None = None
        self.prefill_token_s: float | None = None

    def observe_decode(self, elapsed_s: float) -> None:
        """A step with no prompt chunk."""
        self.decode_step_s = _average(self.decode_step_s, elapsed_s)

    def observe_chunks(self, tokens: int, extra_s: float) -> None:
        """A step that prefilled `tokens` prompt tokens and took `extra_s` more than a decode step."""
        if tokens >= MIN_CHUNK or self.prefill_token_s is None:
            self.prefill_token_s = _average(self.prefill_token_s, max(extra_s, 0.0) / tokens)

    def max_chunk(self, stall_steps: float) -> int | None:
        """Prompt tokens a step may carry while the decoding rows wait at most `stall_steps` decode steps more;
        None before both were measured."""
        if self.decode_step_s is None or not self.prefill_token_s:
            return None
        return int(stall_steps * self.decode_step_s / self.prefill_token_s)


def _average(average: float | None, value: float) -> float:
    return value if average is None else (1 - WEIGHT) * average + WEIGHT * value
