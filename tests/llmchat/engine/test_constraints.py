"""Constrained decoding in the engine: batched grammar masks, and forced tokens appended without model steps
giving exactly the tokens step-by-step decoding gives."""

import gc
import json
import threading
import weakref

import jsonschema
import pytest
import torch

from llmchat.chat.grammar import GrammarCompiler, json_grammar, tool_call_grammar
from llmchat.chat.toolcalls import PARSERS, ToolSpec
from llmchat.engine import Engine, SchedulerConfig
from llmchat.engine.constraints import Constraint, GrammarMasks
from llmchat.engine.sampling import SamplingParams
from tests.conftest import WEATHER_SCHEMA, prompt_ids, run_engine

CAST = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "characters": {
            "type": "array",
            "minItems": 2,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "role": {"type": "string", "enum": ["hero", "villain", "friend"]},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "alive": {"type": "boolean"},
                },
                "required": ["name", "role", "age", "alive"],
            },
        },
    },
    "required": ["title", "characters"],
}
EVENT = {
    "type": "object",
    "properties": {
        "when": {"type": "string", "format": "date"},
        "kind": {"type": "string", "enum": ["meeting", "meetup", "party"]},
        "guests": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 2},
    },
    "required": ["when", "kind", "guests"],
}
TOOLS = (
    ToolSpec("get_weather", "Current weather in a city", WEATHER_SCHEMA),
    ToolSpec("get_time", "Local time in a city", {"type": "object", "properties": {"city": {"type": "string"}}}),
)
PROMPTS = [
    "Describe the cast of a short story about a lighthouse keeper.",
    "Plan something for next Friday with two friends.",
    "What is the weather like in Paris, and what time is it there?",
    "Hi",
]


@pytest.fixture(scope="module")
def compiler(loaded):
    return GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size)


def grammars(compiler) -> dict[str, str]:
    hermes = PARSERS["hermes"].syntax
    return {
        "cast": json_grammar(CAST),
        "event": json_grammar(EVENT),
        "any object": json_grammar(None),
        "required calls": tool_call_grammar(
            hermes, TOOLS, required=True, max_calls=2, special_token=compiler.special_token
        ),
        "auto calls": tool_call_grammar(hermes, TOOLS, required=False, max_calls=2),
    }


def generate_all(loaded, compiler, jump_forward: bool, fused: bool = True, max_tokens: int = 80):
    """Every grammar with every prompt, all at once in one batch: (tokens, finish reason, steps) per request."""

    async def body(engine: Engine):
        seqs = []
        for grammar in grammars(compiler).values():
            for text in PROMPTS:
                params = SamplingParams(max_tokens, temperature=0.0, constraint=compiler.constraint(grammar))
                seqs.append(engine.submit(prompt_ids(loaded, text), params))
        for seq in seqs:
            async for _ in engine.stream(seq):
                pass
        return [(s.completion_ids, s.finish_reason, s.num_steps) for s in seqs]

    config = SchedulerConfig(max_running=20, max_waiting=64)
    return run_engine(loaded, config, body, jump_forward=jump_forward, fused_forward=fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused pass", "transformers forward"])
def test_forced_tokens_give_the_step_by_step_tokens_with_fewer_steps(loaded, compiler, fused):
    jumped = generate_all(loaded, compiler, jump_forward=True, fused=fused)
    stepped = generate_all(loaded, compiler, jump_forward=False, fused=fused)
    assert [(tokens, reason) for tokens, reason, _ in jumped] == [(tokens, reason) for tokens, reason, _ in stepped]
    # Step by step, every token costs a model step (and an end of sequence one more).
    assert all(steps >= len(tokens) for tokens, _, steps in stepped)
    # Forced spans were skipped: in every JSON reply, and overall well under one step per token.
    for tokens, _, steps in jumped[: 3 * len(PROMPTS)]:
        assert steps < len(tokens)
    assert sum(s for *_, s in jumped) < 0.8 * sum(len(t) for t, *_ in jumped)


def test_forced_replies_are_valid_json_for_their_schemas(loaded, compiler):
    jumped = generate_all(loaded, compiler, jump_forward=True, max_tokens=200)
    checker = jsonschema.FormatChecker()
    for schema, start in ((CAST, 0), (EVENT, len(PROMPTS))):
        for tokens, reason, _ in jumped[start : start + len(PROMPTS)]:
            assert reason == "stop"
            jsonschema.validate(json.loads(loaded.tokenizer.decode(tokens)), schema, format_checker=checker)
    calls = len(PROMPTS) * 3
    for tokens, reason, _ in jumped[calls : calls + len(PROMPTS)]:
        assert reason == "stop"
        text = loaded.tokenizer.decode(tokens)
        for block in text.split("<tool_call>")[1:]:
            call = json.loads(block.split("</tool_call>")[0])
            schema = next(t.parameters for t in TOOLS if t.name == call["name"])
            jsonschema.validate(call["arguments"], schema)


def test_forced_text_streams_at_once_and_a_complete_grammar_ends_without_a_step(loaded, compiler):
    """A JSON object of fixed keys: its opening arrives with the first token, and the reply ends the moment the
    object closes (the step that would only pick the end of sequence is skipped)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}

    async def body(engine: Engine):
        params = SamplingParams(20, temperature=0.0, constraint=compiler.constraint(json_grammar(schema)))
        seq = engine.submit(prompt_ids(loaded, "Is water wet?"), params)
        texts = [output.text async for output in engine.stream(seq)]
        return texts, seq

    texts, seq = run_engine(loaded, SchedulerConfig(), body)
    assert texts[0].startswith('{"ok":')
    assert "".join(texts) in ('{"ok": true}', '{"ok": false}')
    assert seq.finish_reason == "stop"
    assert seq.num_steps < len(seq.completion_ids)


def test_logprobs_turn_forced_tokens_off_for_that_request(loaded, compiler):
    async def body(engine: Engine):
        params = SamplingParams(12, temperature=0.0, constraint=compiler.constraint(json_grammar(CAST)), logprobs=0)
        seq = engine.submit(prompt_ids(loaded, PROMPTS[0]), params)
        logprobs = [lp async for output in engine.stream(seq) for lp in output.logprobs or []]
        return seq, logprobs

    seq, logprobs = run_engine(loaded, SchedulerConfig(), body)
    assert seq.num_steps == len(seq.completion_ids) == len(logprobs) == 12


def test_masks_for_a_batch_equal_each_matchers_own(loaded, compiler):
    """The byte-table masking of the whole batch allows exactly the tokens each matcher's bitmask allows."""
    constraints = [compiler.constraint(g) for g in grammars(compiler).values()]
    for constraint, text in zip(constraints, ['{"title": "A', '{"when', "", "<tool_call>", "Sure"], strict=True):
        constraint.consume(loaded.tokenizer.encode(text, add_special_tokens=False))
    vocab = loaded.model.config.vocab_size
    logits = torch.randn(len(constraints) + 1, vocab)
    masked = logits.clone()
    masks = GrammarMasks()
    try:
        errors = masks.apply([*constraints, None], masked)
    finally:
        masks.shutdown()
    assert errors == [None] * (len(constraints) + 1)
    for row, constraint in enumerate(constraints):
        words = torch.frombuffer(bytearray(constraint.matcher.compute_bitmask()), dtype=torch.int32)
        allowed = ((words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab].bool()
        assert torch.equal(masked[row].isfinite(), allowed)
        assert torch.equal(masked[row][allowed], logits[row][allowed])
        assert 0 < int(allowed.sum()) < vocab
    assert torch.equal(masked[-1], logits[-1])


def test_masks_being_computed_keep_their_memory_when_their_rows_go(compiler):
    """A batch whose rows all finish while the mask thread fills it: the memory it writes must stay allocated
    until it is done, then be freed."""
    masks = GrammarMasks()
    busy = threading.Event()
    try:
        masks._thread.submit(busy.wait, 30)  # the mask thread is busy, so the batch below waits its turn
        constraint = compiler.constraint(grammars(compiler)["cast"])
        masks.start([constraint])
        batch, _ = constraint.mask
        bits, done = weakref.ref(batch.bits), batch.done
        del constraint, batch  # its only row finished: nothing in the engine refers to the batch any more
        gc.collect()
        assert bits() is not None
        busy.set()
        done.result(timeout=30)  # written
    finally:
        busy.set()
        masks.shutdown()
    gc.collect()
    assert bits() is None  # and freed once written


def test_a_reply_with_forced_tokens_is_reused_by_the_next_turn(loaded, compiler):
    """Forced spans leave masked columns inside a row of the batch; the prefix cache must store only the real
    ones, so the next turn that starts with this reply reads it from the cache and decodes the same tokens."""
    schema_grammar = json_grammar(CAST)

    async def body(engine: Engine):
        first = [prompt_ids(loaded, PROMPTS[0]), prompt_ids(loaded, PROMPTS[1])]
        seqs = [
            engine.submit(ids, SamplingParams(60, temperature=0.0, constraint=compiler.constraint(schema_grammar)))
            for ids in first
        ]
        for seq in seqs:
            async for _ in engine.stream(seq):
                pass
        follow = seqs[0].prompt_ids + seqs[0].completion_ids + prompt_ids(loaded, "Now make it shorter.")[1:]
        second = engine.submit(follow, SamplingParams(24, temperature=0.0))
        async for _ in engine.stream(second):
            pass
        return second

    cached = run_engine(loaded, SchedulerConfig(), body)
    uncached = run_engine(loaded, SchedulerConfig(), body, prefix_cache_bytes=0)
    assert cached.num_cached_tokens > len(prompt_ids(loaded, PROMPTS[0]))
    assert cached.completion_ids == uncached.completion_ids


def test_a_refused_token_ends_the_reply_with_what_was_valid(loaded, compiler):
    """A token the grammar refuses (here a processor forces one at the fourth step) ends that reply there, as a
    stop with the refusal said, never an error; the tokens before it stay, and its batch goes on."""
    refused = loaded.tokenizer.encode("zzz", add_special_tokens=False)[0]

    def force_refused(completion_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        if len(completion_ids) < 3:
            return row
        out = torch.full_like(row, float("-inf"))
        out[refused] = 0.0
        return out

    async def body(engine: Engine):
        grammar = json_grammar(CAST)
        bad = SamplingParams(
            40, temperature=0.0, constraint=compiler.constraint(grammar), logits_processors=(force_refused,)
        )
        good = SamplingParams(10, temperature=0.0, constraint=compiler.constraint(grammar))
        seqs = [engine.submit(prompt_ids(loaded, PROMPTS[0]), p) for p in (bad, good)]
        outputs = [[o async for o in engine.stream(seq)] for seq in seqs]
        return seqs, outputs

    (bad, good), (bad_outputs, _) = run_engine(loaded, SchedulerConfig(), body, jump_forward=False)
    last = bad_outputs[-1]
    assert bad.finish_reason == last.finish_reason == "stop" and last.error is None
    assert "refused" in last.refusal and refused not in bad.completion_ids
    assert len(bad.completion_ids) == 3 and "".join(o.text for o in bad_outputs).startswith("{")
    assert good.finish_reason == "length"


class RefusesForced(Constraint):
    """A grammar whose forced tokens start with one it refuses, as llguidance's canonical spelling of a marker
    that the tokenizer also holds as a token of its own once did."""

    def __init__(self, inner: Constraint, refused: int) -> None:
        super().__init__(inner.matcher, inner.vocab_size)
        self.refused = refused

    def forced(self) -> list[int]:
        forced = super().forced()
        return [self.refused, *forced] if forced else forced


def test_forced_tokens_the_grammar_refuses_are_decoded_step_by_step(loaded, compiler):
    refused = loaded.tokenizer.encode("zzz", add_special_tokens=False)[0]
    grammar = grammars(compiler)["required calls"]

    async def body(engine: Engine, wrap: bool):
        constraint = compiler.constraint(grammar)
        params = SamplingParams(
            60, temperature=0.0, constraint=RefusesForced(constraint, refused) if wrap else constraint
        )
        seq = engine.submit(prompt_ids(loaded, PROMPTS[2]), params)
        outputs = [o async for o in engine.stream(seq)]
        return seq.completion_ids, outputs[-1]

    ids, last = run_engine(loaded, SchedulerConfig(), lambda engine: body(engine, True))
    plain, _ = run_engine(loaded, SchedulerConfig(), lambda engine: body(engine, False), jump_forward=False)
    assert ids == plain and last.refusal is None and last.error is None
