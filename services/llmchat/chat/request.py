"""What the chat core is asked (ChatRequest), how it is set up (ChatOptions), and how it refuses (ChatError)."""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmchat.chat.prompt import ChatMessage
from llmchat.chat.toolcalls import ToolSpec


class ChatError(Exception):
    """A request the model cannot serve as asked; `param` names the offending field.

    The chat core names fields its own way (messages, prompt, max_tokens, tools, output_format); each adapter
    maps those names to its wire's with `wire_message` and `wire_param`. A message that mentions fields is a
    function of that map, so a Responses client reads max_output_tokens where a chat client reads max_tokens.
    """

    def __init__(
        self, message: str | Callable[[Mapping[str, str]], str], param: str | None = None, code: str | None = None
    ) -> None:
        self._message = message
        super().__init__(self.message)
        self.param, self.code = param, code

    @property
    def message(self) -> str:
        return self.wire_message({})

    def wire_message(self, names: Mapping[str, str]) -> str:
        if isinstance(self._message, str):
            return self._message
        return self._message(_Names(names))

    def wire_param(self, names: Mapping[str, str]) -> str | None:
        return None if self.param is None else names.get(self.param, self.param)


class _Names(dict):
    """A field-name map in which a field the adapter does not rename keeps its core name."""

    def __missing__(self, key: str) -> str:
        return key


class GenerationError(Exception):
    """The engine failed while generating; the response is already under way."""


# No tokenizer averages anywhere near 8 characters a token, so longer text cannot fit the context: it
# is refused without tokenizing it (a few MiB of text would hold a worker thread for seconds).
MAX_CHARS_PER_TOKEN = 8


@dataclass(slots=True)
class Sampling:
    """What shapes the draw beyond temperature, top_p and top_k (engine.sampling.SamplingParams says how)."""

    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()
    include_stop: bool = False  # include_stop_str_in_output
    skip_special_tokens: bool = True  # a call marker that is a special token is kept all the same


@dataclass(slots=True)
class ChatRequest:
    """What to generate; `messages` go through the chat template, unless `prompt` (raw text) is set."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"  # none | auto | required | function (then tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = None  # with json_output: the schema the output must match
    json_output: bool = False
    # Chat template variables: reasoning_effort (none | minimal | low | medium | high) is passed as one,
    # and "none" also sets enable_thinking=False; template_kwargs are passed as given and win over both.
    reasoning_effort: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None  # raw text, tokenized as is (legacy completions): no template or tools
    logprobs: int | None = None  # None: off; N: each token's log-probability and the N likeliest alternatives
    # The output's shape beyond JSON: (regex | choice | grammar, its text), see grammar.structured_grammar.
    structured: tuple[str, Any] | None = None
    n: int = 1  # choices, all from one prefill of the prompt; choice i draws with seed + i
    sampling: Sampling = field(default_factory=lambda: Sampling())

    @property
    def num_tools(self) -> int:
        return len(self.tools)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def template_variables(self) -> dict[str, Any]:
        variables: dict[str, Any] = {}
        if self.reasoning_effort is not None:
            variables["reasoning_effort"] = self.reasoning_effort
            if self.reasoning_effort == "none":
                variables["enable_thinking"] = False
        return variables | self.template_kwargs

    @property
    def text_field(self) -> str:
        """The request field that holds the prompt's text, for errors about its size."""
        return "prompt" if self.prompt is not None else "messages"

    def num_chars(self) -> int:
        """The characters of everything that goes into the prompt: messages, past calls and tools."""
        if self.prompt is not None:
            return len(self.prompt)
        num = sum(len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls) for m in self.messages)
        for tool in self.tools:
            num += len(tool.name) + len(tool.description or "") + len(json.dumps(tool.parameters or {}))
        return num


@dataclass(slots=True)
class ChatOptions:
    """The chat layer's settings: which parser, whether to check call names, template overrides."""

    tool_parser: str = "auto"
    validate_tool_names: bool = True
    bare_tool_calls: bool = True  # a reply opening with a JSON call is that call (grammar.bare_calls_allowed)
    tool_prompt: Path | None = None
    chat_template: Path | None = None
    reasoning_parser: str = "auto"  # auto (when the template knows <think>) | think | none
    # The most calls in one reply when parallel_tool_calls is true. Bounded because a small model asked for
    # calls may otherwise go on making them until max_tokens (which defaults to the rest of the context).
    max_tool_calls: int = 8
    max_n: int = 16  # the most choices one request may ask for
