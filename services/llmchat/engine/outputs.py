"""Output processing: each sampled token into its sequence's reply. The tokens a grammar forces after it
(jump-forward), an end of sequence or stop token, stop strings, max_tokens; the text detokenized as it
grows and streamed with the log-probabilities sampled since the last output."""

import logging
import time

import torch
from tokenizers.decoders import DecodeStream

from llmchat.engine.constraints import GrammarError
from llmchat.engine.sampling import StopChecker, TokenLogprob
from llmchat.engine.scheduler import Output, Sequence

log = logging.getLogger("llmchat.engine")


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: frozenset[int], jump_forward: bool) -> None:
        """`jump_forward`: append the tokens a grammar forces without a model step for each."""
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.jump_forward = jump_forward
        self.num_output_tokens = 0  # since start

    def start(self, seq: Sequence, device: torch.device) -> None:
        """The per-sequence decoding state: its generator, detokenizer and stop strings."""
        seq.admitted_ns = time.time_ns()
        generator = torch.Generator(device=device)
        if seq.params.seed is not None:
            generator.manual_seed(seq.params.seed)
        else:
            generator.seed()
        seq.generator = generator
        # Seeding the decoder with the prompt's tail gives the first token its correct leading space.
        seq.decoder = DecodeStream(ids=seq.prompt_ids[-4:], skip_special_tokens=seq.params.skip_special_tokens)
        seq.stops = StopChecker(seq.params.stop, seq.params.include_stop)

    def take(self, seq: Sequence, token: int, error: Exception | None, logprob: TokenLogprob | None) -> None:
        """Appends the sampled token and any the grammar then forces. A row whose grammar refuses its token ends
        there, with what was valid (the output's `refusal` says why); one whose processor or logits failed (NaN)
        ends in an error."""
        seq.num_steps += 1
        if logprob is not None and not self.ends(seq, token):
            seq.logprobs.append(logprob)
        try:
            if error is not None:
                raise error
            forced, complete = self._forced_after(seq, token)
        except GrammarError as exc:  # the output so far is valid: it ends there, not in an error
            assert seq.stops is not None, "start() made it"
            output = self._output(seq, seq.stops.flush(), "stop")
            output.refusal = str(exc)
            seq.finish(output)
            return
        except Exception as exc:  # a processor's or the logits' failure ends its own sequence
            log.error("sampling failed; ending one sequence", exc_info=exc)
            seq.finish(Output("", len(seq.completion_ids), "error", f"{type(exc).__name__}: {exc}"))
            return
        self._append(seq, forced, complete)

    def _forced_after(self, seq: Sequence, token: int) -> tuple[list[int], bool]:
        """The sampled token and those the grammar forces after it, and whether the grammar is then complete.

        Forced tokens are skipped when log-probabilities are asked for: they would need a model step each.
        """
        constraint = seq.params.constraint
        if constraint is None or self.ends(seq, token):
            return [token], False
        constraint.consume([token])
        if not self.jump_forward or seq.params.logprobs is not None:
            return [token], False
        forced = constraint.forced()
        # llguidance spells forced text in its canonical tokens; where the grammar refuses one of them (a marker
        # the tokenizer also has as a token of its own), the rest is decoded step by step under the mask.
        forced = forced[: constraint.try_consume(forced)]
        return [token, *forced], constraint.is_done

    def ends(self, seq: Sequence, token: int) -> bool:
        """Whether the token ends the output: an end of sequence (unless ignore_eos) or one of stop_token_ids."""
        return (token in self.eos_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids

    def decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _append(self, seq: Sequence, tokens: list[int], complete: bool = False) -> None:
        """Adds the tokens to the completion and streams their text as one output; ends the sequence at an end
        of sequence token, a stop string, max_tokens, or (`complete`) a grammar that allows nothing more."""
        stops, decoder = seq.stops, seq.decoder
        assert stops is not None and decoder is not None, "start() made them"
        text = ""
        for token in tokens:
            if self.ends(seq, token):
                seq.finish(self._output(seq, text + stops.flush(), "stop"))
                return
            seq.completion_ids.append(token)
            self.num_output_tokens += 1
            piece = decoder.step(self.tokenizer.backend_tokenizer, token) or ""
            safe, stopped = stops.feed(piece, armed=len(seq.completion_ids) >= seq.params.min_tokens)
            text += safe
            if stopped:
                seq.finish(self._output(seq, text, "stop", stops.matched))
                return
            if len(seq.completion_ids) >= seq.params.max_tokens:
                seq.finish(self._output(seq, text + stops.flush(), "length"))
                return
        if complete:
            seq.finish(self._output(seq, text + stops.flush(), "stop"))
            return
        seq.pending = tokens
        if text:
            seq.emit(self._output(seq, text))

    @staticmethod
    def _output(seq: Sequence, text: str, finish_reason: str | None = None, stop: str | None = None) -> Output:
        """An output with the log-probabilities of the tokens sampled since the last one (held-back text's too)."""
        logprobs, seq.logprobs = (seq.logprobs or None), []
        return Output(text, len(seq.completion_ids), finish_reason, stop_sequence=stop, logprobs=logprobs)
