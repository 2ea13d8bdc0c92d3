"""Protocol-neutral chat: ChatRequest in, a stream of ChatEvents (text, reasoning, tool calls, finish) out.

Protocol adapters build a ChatRequest, call Chat.prepare() (which checks everything that can fail
before a response starts), Chat.start(), then turn Chat.events() into their own wire format.
"""

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2

from llmchat.chat.events import (
    ChatEvent,
    Finish,
    Logprobs,
    Notice,
    ReasoningDelta,
    TextDelta,
)
from llmchat.chat.grammar import (
    GrammarCompiler,
    GrammarError,
    bare_calls_allowed,
    json_grammar,
    structured_grammar,
    tool_call_grammar,
)
from llmchat.chat.prompt import RESERVED_TEMPLATE_KEYS, PromptRenderer
from llmchat.chat.reasoning import ReasoningSplitter, starts_in_reasoning, template_reasons
from llmchat.chat.request import MAX_CHARS_PER_TOKEN, ChatError, ChatOptions, ChatRequest, GenerationError
from llmchat.chat.toolcalls import PARSERS, ToolParser
from llmchat.engine import Engine, Sequence
from llmchat.engine.constraints import Constraint
from llmchat.engine.sampling import SamplingParams

log = logging.getLogger("llmchat.chat")


@dataclass(slots=True)
class PreparedChat:
    prompt_ids: list[int]
    params: SamplingParams
    parser: ToolParser | None = None
    reasoning: ReasoningSplitter | None = None
    call_ends: list[int] = field(default_factory=list)  # the completion tokens when each call was complete
    siblings: list["PreparedChat"] = field(default_factory=list)  # n > 1: choices 1.., each with its own state

    @property
    def choices(self) -> list["PreparedChat"]:
        return [self, *self.siblings]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def ending(self, num_tokens: int) -> list[ChatEvent] | None:
        """Whether the reply ends here, `num_tokens` into it, though the model would go on (None: it goes on;
        else what to record first). It ends at a repeated call (the parser dropped it), and after a call when
        what is left of max_tokens is less than the longest call so far took: the next call would most likely
        be cut short, and a reply of whole calls serves a client better than one ending in a broken call."""
        parser = self.parser
        if parser is None:
            return None
        if parser.ended:
            return []
        if parser.num_complete == len(self.call_ends):
            return None
        self.call_ends += [num_tokens] * (parser.num_complete - len(self.call_ends))
        longest = max(end - begin for begin, end in itertools.pairwise([0, *self.call_ends]))
        left = self.params.max_tokens - num_tokens
        if left >= longest:
            return None
        parser.end()
        message = f"{left} tokens were left of max_tokens, fewer than the longest call took ({longest}); ended there"
        return [Notice("tool_call.budget", message, expected=True)]

    def parse(self, text: str) -> list[ChatEvent]:
        """Model text -> events. Reasoning is split off first, so only answer text can hold tool calls."""
        parts = self.reasoning.feed(text) if self.reasoning else [TextDelta(text)]
        return self._answer(parts)

    def parse_end(self) -> list[ChatEvent]:
        """Generation stopped: what the splitter and the tool parser held back."""
        events = self._answer(self.reasoning.finish()) if self.reasoning else []
        return events + (self.parser.finish() if self.parser else [])

    def _answer(self, parts: list[ReasoningDelta | TextDelta]) -> list[ChatEvent]:
        if self.parser is None:
            return list(parts)
        events: list[ChatEvent] = []
        for part in parts:
            events.extend(self.parser.feed(part.text) if isinstance(part, TextDelta) else [part])
        return events


def detect_family(template: str | None, knows_tools: bool) -> str:
    """The tool-call family from the chat template; our built-in prompt teaches the Hermes syntax. A template that
    takes tools but spells calls in none of the known ways gets "none" (NO_PARSER)."""
    if not knows_tools or not template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral_args" if "[ARGS]" in template else "mistral"
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "parameters" in template:
        return "llama3"
    return NO_PARSER


# Tools reach the template, but calls are neither constrained nor parsed: the reply is the model's text.
NO_PARSER = "none"
UNKNOWN_SYNTAX = (
    "the chat template takes tools but marks calls in no syntax llmchat knows (hermes, llama3, mistral, "
    "mistral_args, qwen3_coder), so "
    "tools are passed to the template and replies come back as text, without constrained or parsed calls"
)


class Chat:
    """The chat core over one engine: prompt rendering, constrained decoding and tool-call parsing."""

    def __init__(self, engine: Engine, options: ChatOptions | None = None) -> None:
        options = options or ChatOptions()
        self.engine = engine
        tokenizer = engine.tokenizer
        if options.chat_template is not None:
            tokenizer.chat_template = options.chat_template.read_text()
        self.renderer = PromptRenderer(tokenizer, options.tool_prompt)
        family = options.tool_parser
        if family == "auto":
            family = detect_family(tokenizer.chat_template, self.renderer.knows_tools)
        self.parser_class = PARSERS.get(family)
        self.no_parser_reason = None
        if self.parser_class is None:
            self.no_parser_reason = UNKNOWN_SYNTAX if options.tool_parser == "auto" else "set by tool_parser=none"
            log.warning("tool calls: %s", self.no_parser_reason)
        self.validate_tool_names = options.validate_tool_names
        self.bare_tool_calls = options.bare_tool_calls
        self.max_tool_calls = options.max_tool_calls
        self.max_n = options.max_n
        reasoning = options.reasoning_parser
        self.reasons = reasoning == "think" or (reasoning == "auto" and template_reasons(tokenizer.chat_template))
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    @property
    def grammar(self) -> GrammarCompiler:
        """Built on first use (about a second); the server builds it while loading the model."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarCompiler(self.engine.tokenizer, self.engine.vocab_size)
            return self._grammar

    def describe(self) -> dict:
        """What /health shows of the chat layer: how tool calls and reasoning are parsed."""
        described = {"tool_parser": self.family, "reasoning_parser": "think" if self.reasons else "none"}
        return described | ({"tool_parser_reason": self.no_parser_reason} if self.no_parser_reason else {})

    @property
    def family(self) -> str:
        return self.parser_class.family if self.parser_class is not None else NO_PARSER

    async def prepare(self, request: ChatRequest) -> PreparedChat:
        """Renders and tokenizes the conversation and builds its grammar (off the event loop); checks it fits."""
        self._check(request)
        prompt_ids, prompt_text, constraints = await asyncio.to_thread(self._render, request)
        source = request.text_field
        if not prompt_ids:
            raise ChatError("The prompt is empty; send some text.", source)
        room = self.engine.max_context - len(prompt_ids)
        if room <= 0:
            raise ChatError(
                lambda n: (
                    f"The prompt is {len(prompt_ids)} tokens, which leaves no room in this model's context "
                    f"of {self.engine.max_context} tokens. Shorten the {n[source]}."
                ),
                source,
                "context_length_exceeded",
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise ChatError(
                lambda n: (
                    f"{n['max_tokens']} is {request.max_tokens}, but the prompt is {len(prompt_ids)} tokens "
                    f"and the context is {self.engine.max_context}, so at most {room} tokens can be generated. "
                    f"Lower {n['max_tokens']} or shorten the {n[source]}."
                ),
                "max_tokens",
                "context_length_exceeded",
            )
        first, *siblings = (
            self._choice(request, prompt_ids, prompt_text, constraint, room, i)
            for i, constraint in enumerate(constraints)
        )
        first.siblings = siblings
        return first

    def _choice(
        self,
        request: ChatRequest,
        prompt_ids: list[int],
        prompt_text: str | None,
        constraint: Constraint | None,
        room: int,
        index: int,
    ) -> PreparedChat:
        """One choice's sampling, parser and reasoning splitter; choice i of a seeded request draws with seed + i
        (vLLM's rule), so choices differ from one another and repeat across runs."""
        s = request.sampling
        special = not request.uses_tools or self._marker_token() is None
        params = SamplingParams(
            max_tokens=request.max_tokens or room,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=s.min_p,
            seed=None if request.seed is None else request.seed + index,
            stop=request.stop,
            include_stop=s.include_stop,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=tuple(s.logit_bias.items()),
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            stop_token_ids=frozenset(s.stop_token_ids),
            allowed_token_ids=s.allowed_token_ids,
            bad_words_ids=self._bad_words_ids(s.bad_words),
            constraint=constraint,
            # A family whose call marker is a special token must see it in the decoded text.
            skip_special_tokens=special and s.skip_special_tokens,
            logprobs=request.logprobs,
        )
        parser = None
        if request.uses_tools and self.parser_class is not None:
            names = frozenset(t.name for t in request.tools) if self.validate_tool_names else None
            parser = self.parser_class(
                names,
                stream_arguments=constraint is not None,
                max_calls=self._max_calls(request),
                bare_calls=constraint is not None and self._bare_calls(request),
                schemas={t.name: t.parameters or {} for t in request.tools},
            )
        reasoning = None
        # Output constrained from its first token (a required call, JSON) leaves the model no room to think;
        # after a prompt ending in <think> it would all count as reasoning and the call would be lost.
        forced = request.json_output or request.structured or request.tool_choice in ("required", "function")
        if self.reasons and prompt_text is not None and not forced:
            reasoning = ReasoningSplitter(in_reasoning=starts_in_reasoning(prompt_text))
        return PreparedChat(prompt_ids, params, parser, reasoning)

    def _bad_words_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each bad word's tokens as the model would write it alone and after a space (vLLM's rule)."""
        spelled = {" " + w.lstrip() for w in words} | {w.lstrip() for w in words}
        ids = (tuple(self.renderer.tokenize(text)) for text in sorted(spelled))
        return tuple(dict.fromkeys(word for word in ids if word))

    def _check(self, request: ChatRequest) -> None:
        """What is refused before rendering: the request's shape, and text too long to fit however it tokenizes."""
        if request.prompt is not None:
            if request.tools:
                raise ChatError("A raw text prompt cannot be combined with tools; send messages instead.", "prompt")
        elif not request.messages:
            raise ChatError(lambda n: f"{n['messages']} is empty; send at least one message.", "messages")
        if request.uses_tools and self.parser_class is None and request.tool_choice in ("required", "function"):
            raise ChatError(
                "This model's tool calls cannot be enforced or read: "
                f"{self.no_parser_reason}. Send tool_choice auto (the model may still write a call, as text), "
                "or start the server with a tool_parser for the model's syntax.",
                "tool_choice",
            )
        if request.n > self.max_n:
            raise ChatError(f"n is {request.n}, more than this server's limit of {self.max_n} choices.", "n")
        vocab = self.engine.vocab_size
        for name, ids in (
            ("logit_bias", request.sampling.logit_bias),
            ("stop_token_ids", request.sampling.stop_token_ids),
            ("allowed_token_ids", request.sampling.allowed_token_ids),
        ):
            if bad := [i for i in ids if not 0 <= i < vocab]:
                raise ChatError(
                    f"{name} names token id {bad[0]}, which is not in this model's vocabulary (0 to {vocab - 1}).",
                    f"{name}.{bad[0]}" if name == "logit_bias" else name,
                )
        if reserved := sorted(RESERVED_TEMPLATE_KEYS & request.template_kwargs.keys()):
            raise ChatError(
                f"chat_template_kwargs cannot set {', '.join(reserved)}: the server sets it from the request.",
                f"chat_template_kwargs.{reserved[0]}",
            )
        limit = MAX_CHARS_PER_TOKEN * self.engine.max_context
        if (num_chars := request.num_chars()) > limit:
            source = request.text_field
            raise ChatError(
                lambda n: (
                    f"The {n[source]} hold {num_chars} characters, more than the {limit} "
                    f"({MAX_CHARS_PER_TOKEN} a token) that could fit this model's context of {self.engine.max_context} "
                    f"tokens. Shorten the {n[source]}."
                ),
                source,
                "context_length_exceeded",
            )

    def _render(self, request: ChatRequest) -> tuple[list[int], str | None, list[Constraint | None]]:
        """The prompt's tokens, its text (None for a raw prompt: it is never parsed for reasoning), and each
        choice's grammar (its own matcher: choices advance through it apart)."""
        prompt_ids, prompt_text = self._prompt(request)
        grammar = self._grammar_text(request)
        if grammar is None:
            return prompt_ids, prompt_text, [None] * request.n
        try:
            return prompt_ids, prompt_text, [self.grammar.constraint(grammar) for _ in range(request.n)]
        except GrammarError as exc:
            param = "tools" if request.uses_tools else "structured_outputs" if request.structured else "output_format"
            problem = str(exc)
            raise ChatError(
                lambda n: f"The {n[param]} cannot be enforced by constrained decoding: {problem}", param
            ) from None

    def _prompt(self, request: ChatRequest, add_special_tokens: bool | None = None) -> tuple[list[int], str | None]:
        """The prompt's tokens and its text (None for a raw prompt). `add_special_tokens`: the tokenizer's own
        (a BOS) too; by default a raw prompt gets them and a rendered template, which writes its own, does not."""
        if request.prompt is not None:
            encode = self.renderer.tokenize if add_special_tokens is False else self.renderer.encode
            return encode(request.prompt), None
        tools = request.tools if request.uses_tools else ()
        try:
            prompt_text = self.renderer.render_text(request.messages, tools, request.template_variables())
        except jinja2.TemplateError as exc:
            # Templates reject conversations they cannot express (raise_exception), e.g. roles out of order.
            raise ChatError(f"The chat template cannot render these messages: {exc}", "messages") from None
        encode = self.renderer.encode if add_special_tokens else self.renderer.tokenize
        return encode(prompt_text), prompt_text

    def _grammar_text(self, request: ChatRequest) -> str | None:
        if request.uses_tools and self.parser_class is not None:
            tools = request.tools
            if request.tool_choice == "function":
                tools = tuple(t for t in tools if t.name == request.tool_name)
            return tool_call_grammar(
                self.parser_class.syntax,
                tools,
                required=request.tool_choice in ("required", "function"),
                max_calls=self._max_calls(request),
                special_token=self.grammar.special_token,
                bare=self._bare_calls(request),
            )
        if request.json_output:
            return json_grammar(request.json_schema)
        if request.structured is not None:
            return structured_grammar(*request.structured)
        return None

    def _bare_calls(self, request: ChatRequest) -> bool:
        """Whether a reply may open with a bare JSON call: the grammar and the parser both follow this."""
        syntax = self.parser_class.syntax
        return self.bare_tool_calls and bare_calls_allowed(syntax, request.tools, self.grammar.special_token)

    def _max_calls(self, request: ChatRequest) -> int:
        """The most calls one reply may make: one for a named function or without parallel calls."""
        return self.max_tool_calls if request.parallel_tool_calls and request.tool_choice != "function" else 1

    def _marker_token(self) -> int | None:
        marker = self.parser_class.open if self.parser_class is not None else ""
        return self.grammar.special_token(marker) if marker else None

    async def count_prompt_tokens(self, request: ChatRequest) -> int:
        """The prompt's length in tokens, checked and rendered exactly as prepare() does (off the event loop)."""
        return len(await self.tokenize(request))

    async def tokenize(self, request: ChatRequest, add_special_tokens: bool | None = None) -> list[int]:
        """The prompt's tokens, checked and rendered as prepare() does (off the event loop); `add_special_tokens`
        (vLLM's /tokenize option) overrides whether the tokenizer's own are added, see _prompt."""
        self._check(request)
        prompt_ids, _ = await asyncio.to_thread(self._prompt, request, add_special_tokens)
        return prompt_ids

    def start(self, prepared: PreparedChat) -> list[Sequence]:
        """Queues the generation, one sequence per choice; raises QueueFull when the engine's waiting queue is at
        its bound. Separate from events() so the caller can refuse the request before a response starts.
        """
        return self.engine.submit_choices(prepared.prompt_ids, [c.params for c in prepared.choices])

    async def events(self, prepared: PreparedChat, seq: Sequence) -> AsyncIterator[ChatEvent]:
        """Yields content, reasoning, tool-call events and notices, then one Finish; leaving early aborts."""
        parser = prepared.parser
        async with contextlib.aclosing(self.engine.stream(seq)) as outputs:
            async for output in outputs:
                if output.error is not None:
                    raise GenerationError(output.error)
                if output.logprobs:
                    yield Logprobs(output.logprobs)
                if output.text:
                    for event in prepared.parse(output.text):
                        yield event
                if output.refusal is not None:
                    yield Notice(
                        "grammar.refused", f"the reply ended where the grammar refused a token: {output.refusal}"
                    )
                reason = output.finish_reason
                if reason is None:
                    # Ending here leaves the loop, which aborts the sequence; the tokens counted are those up to
                    # this output, so a stream and a whole response agree.
                    if (ending := prepared.ending(output.num_completion_tokens)) is None:
                        continue
                    for event in ending:
                        yield event
                    reason = "stop"
                for event in prepared.parse_end():
                    yield event
                if parser and parser.num_calls and reason == "stop":
                    reason = "tool_calls"
                yield Finish(
                    reason,
                    seq.num_prompt_tokens,
                    output.num_completion_tokens,
                    None if output.finish_reason is None else output.stop_sequence,
                    cached_tokens=seq.num_cached_tokens,
                    model_steps=seq.num_steps,
                )
                return
