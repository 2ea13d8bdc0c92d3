"""Protocol-neutral chat: ChatRequest in, a stream of ChatEvents (text, tool calls, finish) out.

Protocol adapters build a ChatRequest, call Chat.prepare() (which checks everything that can fail
before a response starts), Chat.start(), then turn Chat.events() into their own wire format.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmchat.engine import Engine, Sequence
from llmchat.events import ChatEvent, Finish, Notice, TextDelta, ToolCallDelta, ToolCallStart
from llmchat.grammar import (
    MAX_PARALLEL_CALLS,
    GrammarCompiler,
    GrammarError,
    GrammarProcessor,
    json_grammar,
    tool_call_grammar,
)
from llmchat.prompt import CallRecord, ChatMessage, PromptRenderer
from llmchat.sampling import SamplingParams
from llmchat.toolcalls import PARSERS, ToolParser, ToolSpec

__all__ = [
    "CallRecord",
    "Chat",
    "ChatError",
    "ChatEvent",
    "ChatMessage",
    "ChatOptions",
    "ChatRequest",
    "Finish",
    "GenerationError",
    "Notice",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallStart",
    "ToolSpec",
]


class ChatError(Exception):
    """A request the model cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class GenerationError(Exception):
    """The engine failed while generating; the response is already under way."""


@dataclass(slots=True)
class ChatRequest:
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"  # none | auto | required | function (then tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = None  # with json_output: the schema the output must match
    json_output: bool = False

    @property
    def num_tools(self) -> int:
        return len(self.tools)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(slots=True)
class ChatOptions:
    """The chat layer's settings: which parser, whether to check call names, template overrides."""

    tool_parser: str = "auto"
    validate_tool_names: bool = True
    tool_prompt: Path | None = None
    chat_template: Path | None = None


@dataclass(slots=True)
class PreparedChat:
    prompt_ids: list[int]
    params: SamplingParams
    parser: ToolParser | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def detect_family(template: str | None, knows_tools: bool) -> str:
    """The tool-call family from the chat template; our built-in prompt teaches the Hermes syntax."""
    if not knows_tools or not template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "parameters" in template:
        return "llama3"
    return "hermes"


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
        self.parser_class = PARSERS[family]
        self.validate_tool_names = options.validate_tool_names
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    @property
    def grammar(self) -> GrammarCompiler:
        """Built on first use (about a second); the server builds it while loading the model."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarCompiler(self.engine.tokenizer, self.engine.vocab_size)
            return self._grammar

    @property
    def family(self) -> str:
        return self.parser_class.family

    async def prepare(self, request: ChatRequest) -> PreparedChat:
        """Renders and tokenizes the conversation and builds its grammar (off the event loop); checks it fits."""
        prompt_ids, processor = await asyncio.to_thread(self._render, request)
        room = self.engine.max_context - len(prompt_ids)
        if room <= 0:
            raise ChatError(
                f"The prompt is {len(prompt_ids)} tokens, which leaves no room in this model's context of "
                f"{self.engine.max_context} tokens. Shorten the messages.",
                "messages",
                "context_length_exceeded",
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise ChatError(
                f"max_tokens is {request.max_tokens}, but the prompt is {len(prompt_ids)} tokens and the context "
                f"is {self.engine.max_context}, so at most {room} tokens can be generated. "
                "Lower max_tokens or shorten the messages.",
                "max_tokens",
                "context_length_exceeded",
            )
        params = SamplingParams(
            max_tokens=request.max_tokens or room,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop,
            logits_processors=(processor,) if processor else (),
            # A family whose call marker is a special token must see it in the decoded text.
            skip_special_tokens=not request.uses_tools or self._marker_token() is None,
        )
        parser = None
        if request.uses_tools:
            names = frozenset(t.name for t in request.tools) if self.validate_tool_names else None
            parser = self.parser_class(
                names,
                stream_arguments=processor is not None,
                max_calls=MAX_PARALLEL_CALLS if request.parallel_tool_calls else 1,
            )
        return PreparedChat(prompt_ids, params, parser)

    def _render(self, request: ChatRequest) -> tuple[list[int], GrammarProcessor | None]:
        tools = request.tools if request.uses_tools else ()
        prompt_ids = self.renderer.render(request.messages, tools)
        grammar = self._grammar_text(request)
        if grammar is None:
            return prompt_ids, None
        try:
            return prompt_ids, self.grammar.processor(grammar)
        except GrammarError as exc:
            param = "tools" if request.uses_tools else "response_format"
            raise ChatError(f"The {param} cannot be enforced by constrained decoding: {exc}", param) from None

    def _grammar_text(self, request: ChatRequest) -> str | None:
        if request.uses_tools:
            tools = request.tools
            if request.tool_choice == "function":
                tools = tuple(t for t in tools if t.name == request.tool_name)
            return tool_call_grammar(
                self.parser_class.syntax,
                tools,
                required=request.tool_choice in ("required", "function"),
                parallel=request.parallel_tool_calls and request.tool_choice != "function",
                special_token=self.grammar.special_token,
            )
        if request.json_output:
            return json_grammar(request.json_schema)
        return None

    def _marker_token(self) -> int | None:
        marker = self.parser_class.open
        return self.grammar.special_token(marker) if marker else None

    def start(self, prepared: PreparedChat) -> Sequence:
        """Queues the generation; raises QueueFull when the engine's waiting queue is at its bound.

        Separate from events() so the caller can refuse the request before a response starts.
        """
        return self.engine.submit(prepared.prompt_ids, prepared.params)

    async def events(self, prepared: PreparedChat, seq: Sequence) -> AsyncIterator[ChatEvent]:
        """Yields content, tool-call events and notices, then one Finish; leaving early aborts the generation."""
        parser = prepared.parser
        async for output in self.engine.stream(seq):
            if output.error is not None:
                raise GenerationError(output.error)
            if output.text:
                for event in parser.feed(output.text) if parser else [TextDelta(output.text)]:
                    yield event
            if output.finish_reason is not None:
                reason = output.finish_reason
                if parser:
                    for event in parser.finish():
                        yield event
                    if parser.num_calls and reason == "stop":
                        reason = "tool_calls"
                yield Finish(reason, seq.num_prompt_tokens, output.num_completion_tokens)
