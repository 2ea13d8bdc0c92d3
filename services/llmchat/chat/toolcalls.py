"""Tool-call parsers, one per model family: streamed model text in, content and tool-call events out.

Every parser is character-driven, so the events concatenate to the same result however the text is
chunked (a marker split across tokens included). Two modes:
- stream_arguments=True (the output is grammar-constrained, so calls are known to be well formed): a
  call starts as soon as its name is read, and its arguments stream as they are generated;
- stream_arguments=False: each call is held until its JSON is complete and checked. Malformed or
  unknown calls then fall back to plain content, with a Notice for the request's span.

A call identical to an earlier one of the same output (same name, same arguments as JSON values) ends the
output there: it is dropped and `ended` is set, so the caller stops generating. In the streaming mode a
call whose name an earlier call already used is held until its arguments are complete, so a repeat never
sends a fragment; a call under a new name streams at once.
"""

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from llmchat.chat.call_object import CallObject, call_key, partial_suffix
from llmchat.chat.call_rewrites import ArgsMarkerCalls, XmlCalls
from llmchat.chat.events import ChatEvent, Notice, TextDelta, ToolCallCut, ToolCallDelta, ToolCallStart


@dataclass(slots=True, frozen=True)
class ToolSpec:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


@dataclass(slots=True, frozen=True)
class CallSyntax:
    """How a family spells a block of calls when we make the model write one (see grammar.py)."""

    open: str  # the marker that starts a block; "" means calls only at the very start of the output
    list_open: str
    sep: str
    close: str
    args_key: str = "arguments"
    # The markers in the strings above that a tokenizer may hold as tokens of their own (grammar.py).
    markers: tuple[str, ...] = ()
    # Whether models of the family, where the open marker is a token, also answer a call as a bare JSON object
    # (in a ```json fence or not) at the start of the reply: small Qwen2.5 models do, under tool_choice auto.
    bare: bool = False
    # A marker the model may write just before calls that start the output (Llama 3's <|python_tag|>), allowed
    # where the tokenizer has it as a token; the text it decodes to is the parser's alt_open.
    lead: str = ""
    # Where set, a call is spelled NAME, this marker, then the arguments' JSON object (newer Mistral tokenizers'
    # get_weather[ARGS]{...}) rather than a JSON object holding both.
    args_marker: str = ""
    # Calls spelled as Qwen3-Coder's XML (call_rewrites.XmlCalls) rather than a JSON object.
    xml: bool = False


FENCE = "```"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser:
    """Splits streamed model text into content and tool calls, for one family's call syntax.

    The syntax: `open` starts a region of calls (empty: only at the very start of the output, after an
    optional `alt_open`), `list_open` may follow, calls are JSON objects separated by `sep`, and `close`
    ends the region (empty: the region runs to the end of the output).
    """

    family = ""
    syntax: CallSyntax
    open = ""
    alt_open = ""
    list_open = ""
    sep = ""
    close = ""

    def __init__(
        self,
        tool_names: frozenset[str] | None = None,
        *,
        stream_arguments: bool = False,
        max_calls: int | None = None,
        bare_calls: bool = False,
        schemas: Mapping[str, Any] | None = None,
    ) -> None:
        """`bare_calls`: a JSON object at the very start of the output, bare or in a ```json fence, is a call too
        (CallSyntax.bare; the grammar then allows nothing else there). `schemas`: each offered tool's parameters,
        for families whose arguments are not written as JSON."""
        self.tool_names = tool_names
        self.schemas = schemas or {}
        self.stream_arguments = stream_arguments
        self.max_calls = max_calls
        self.state = ("lead" if bare_calls else "text") if self.open else "start"
        self.buf = ""
        self.ws = ""
        self.raw = ""
        self.out: list[ChatEvent] = []
        self.num_calls = 0
        self.call = CallObject()
        self.started = False
        self.sent = 0
        self.keys: set[tuple[str, str]] = set()  # the calls made so far, as call_key()s
        self.ended = False  # the reply ended (a repeated call, or end()); the rest of the output is ignored

    def end(self) -> None:
        """Stops reading: the reply ends here, though the model may go on (what follows is ignored)."""
        self.state, self.ended, self.buf = "ended", True, ""

    @property
    def num_complete(self) -> int:
        """The calls made and complete so far."""
        return len(self.keys)

    def feed(self, text: str) -> list[ChatEvent]:
        self.buf += text
        while self._step(final=False):
            pass
        out, self.out = self.out, []
        return out

    def finish(self) -> list[ChatEvent]:
        """Ends the stream: releases held text and settles a call left open."""
        if self.ended:
            return []
        while self._step(final=True):
            pass
        if self.state in ("text", "plain", "start"):
            self._content(self.buf)
        elif self.state in ("list", "item", "call") and self.started:
            self.out.append(ToolCallCut(self.num_calls - 1, "the output ended inside a tool call's arguments"))
        elif self.state == "rejected" or (self.state in ("list", "item", "call") and not self.stream_arguments):
            if self.state != "rejected":
                self.out.append(Notice("tool_call.unterminated", "the output ended before the tool call was complete"))
            self._content(self.raw + self.call.text + self.buf)
        elif self.state in ("list", "item", "call"):
            # Under a grammar (the streaming mode) this text could only become a call; cut short before it was
            # sent (its name unread, or held as a possible repeat) it is dropped, never passed off as content.
            self.out.append(Notice("tool_call.unterminated", "the output ended inside a tool call not yet sent"))
        self.buf = ""
        if not self.num_calls:
            self._content(self.ws, keep_ws=False)
        out, self.out = self.out, []
        return out

    def _step(self, final: bool) -> bool:
        """Advances the state machine over self.buf; False when it needs more text (or the stream ended)."""
        state = self.state
        if state == "ended":
            self.buf = ""
            return False
        if state == "plain":
            self._content(self.buf)
            self.buf = ""
            return False
        if state == "text":
            return self._find_open(final)
        if state == "lead":
            return self._at_lead(final)
        if state == "rejected":
            return self._skip_rejected()
        if state not in ("start", "call") and not self._skip_ws():
            return False
        if state == "start":
            return self._at_start(final)
        if state == "list":
            return self._expect(self.list_open, "item", final)
        if state == "item":
            if not self.buf.startswith("{"):
                return self._reject("expected a JSON object for the call")
            self.call, self.started, self.sent, self.state = CallObject(), False, 0, "call"
            return True
        if state == "call":
            return self._scan()
        # after: a call is complete.
        if self.sep and self.buf.startswith(self.sep):
            self.buf, self.state = self.buf[len(self.sep) :], "item"
            return True
        if self.close and self.buf.startswith(self.close):
            return self._expect(self.close, "text", final)
        if self.close and self.close.startswith(self.buf):
            if final:  # a close marker cut off by the end of the output is still marker text
                self.buf = ""
            return False
        self.state = "text" if self.open else "plain"
        return True

    def _at_start(self, final: bool) -> bool:
        body = self.buf.lstrip()
        if not body and not final:
            return False
        if self.alt_open and body.startswith(self.alt_open):
            self.buf, self.state = body[len(self.alt_open) :], "item"
        elif self.alt_open and self.alt_open.startswith(body) and body and not final:
            return False
        elif body.startswith("{"):
            self.buf, self.state = body, "item"
        else:
            self.state = "plain"
        return True

    def _at_lead(self, final: bool) -> bool:
        """The output's start, where a JSON object, bare or in a ```json fence, is a call that ends the region."""
        body = self.buf.lstrip()
        fence = re.match(r"```(json)?\s*", body)
        start = fence.end() if fence else 0
        if body[start : start + 1] == "{":
            self.raw = self.buf[: len(self.buf) - len(body) + start]
            self.buf, self.state = body[start:], "item"
            self.sep, self.close = "", FENCE if fence else ""
            return True
        if not final and (start == len(body) or "```json".startswith(body)):
            return False  # not yet known: nothing but whitespace or (part of) a fence so far
        self.state = "text"
        return True

    def _find_open(self, final: bool) -> bool:
        at = self.buf.find(self.open)
        if at < 0:
            keep = 0 if final else partial_suffix(self.buf, self.open)
            self._content(self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
            return False
        self._content(self.buf[:at], keep_ws=False, before_call=True)
        self.raw, self.buf = self.open, self.buf[at + len(self.open) :]
        self.state = "list" if self.list_open else "item"
        return True

    def _expect(self, literal: str, next_state: str, final: bool) -> bool:
        if self.buf.startswith(literal):
            self.raw += literal
            self.buf, self.state = self.buf[len(literal) :], next_state
            return True
        if literal.startswith(self.buf) and not final:
            return False
        return self._reject(f"expected {literal!r} in the call block")

    def _skip_ws(self) -> bool:
        body = self.buf.lstrip()
        self.raw += self.buf[: len(self.buf) - len(body)]
        self.buf = body
        return bool(body)

    def _scan(self) -> bool:
        call = self.call
        for n, ch in enumerate(self.buf):
            call.feed(ch)
            if self.stream_arguments and not self.started and call.name is not None and call.error is None:
                if problem := self._refusal(call.name):
                    call.error = problem
                elif all(name != call.name for name, _ in self.keys):
                    self._start(call.name)
            if call.error is not None or call.is_done:
                self.buf = self.buf[n + 1 :]
                if call.error is not None:
                    self._send_args(call.streaming_args())
                    return self._reject(call.error)
                self._complete(call)
                return True
        self.buf = ""
        self._send_args(call.streaming_args())
        return False

    def _send_args(self, args: str) -> None:
        if self.started and len(args) > self.sent:
            self.out.append(ToolCallDelta(self.num_calls - 1, args[self.sent :]))
            self.sent = len(args)

    def _complete(self, call: CallObject) -> None:
        key = call_key(call.name, call.arguments())
        if key in self.keys:
            message = f"the model repeated its call to {call.name!r}; the reply ends there"
            self.out.append(Notice("tool_call.repeated", message, expected=True))
            self.end()
            return
        if not self.started:
            if problem := self._refusal(call.name):
                self._reject(problem)
                return
            self._start(call.name)
        self.keys.add(key)
        self._send_args(call.arguments())
        self.raw, self.state = "", "after"
        self.call, self.started = CallObject(), False

    def _refusal(self, name: str) -> str | None:
        if self.tool_names is not None and name not in self.tool_names:
            return f"the model called {name!r}, which is not one of the offered tools"
        if self.max_calls is not None and self.num_calls >= self.max_calls:
            return f"the model made more than {self.max_calls} tool call(s), the most this request allows"
        return None

    def _start(self, name: str) -> None:
        self.out.append(ToolCallStart(self.num_calls, new_call_id(), name))
        self.num_calls += 1
        self.started = True

    def _reject(self, reason: str) -> bool:
        self.out.append(Notice("tool_call.rejected", reason))
        # What was already sent as a call stays a call; the rest of the region becomes content.
        call = self.call
        self.raw = call.text[call.args_end or len(call.text) - 1 :] if self.started else self.raw + call.text
        self.call, self.started, self.state = CallObject(), False, "rejected"
        return True

    def _skip_rejected(self) -> bool:
        self.raw, self.buf = self.raw + self.buf, ""
        skip = len(self.open) if self.raw.startswith(self.open) else 0
        at = self.raw.find(self.close, skip) if self.close else -1
        if at < 0:
            return False
        end = at + len(self.close)
        self._content(self.raw[:end])
        self.buf, self.raw, self.state = self.raw[end:], "", "text" if self.open else "plain"
        return True

    def _content(self, text: str, keep_ws: bool = True, before_call: bool = False) -> None:
        """Emits content, holding trailing whitespace until it is known not to sit just before a call."""
        text, self.ws = self.ws + text, ""
        if before_call:
            text = text.rstrip()
        elif keep_ws:
            body = text.rstrip()
            text, self.ws = body, text[len(body) :]
        if text:
            self.out.append(TextDelta(text))


class HermesParser(ToolParser):
    """Hermes, Qwen 2.5/3 and our built-in prompt: <tool_call>{"name": ..., "arguments": {...}}</tool_call>."""

    family = "hermes"
    open = "<tool_call>"
    close = "</tool_call>"
    syntax = CallSyntax(
        "<tool_call>",
        "\n",
        "\n</tool_call>\n<tool_call>\n",
        "\n</tool_call>",
        markers=("<tool_call>", "</tool_call>"),
        bare=True,
    )


class MistralParser(ToolParser):
    """Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]."""

    family = "mistral"
    open = "[TOOL_CALLS]"
    list_open = "["
    sep = ","
    close = "]"
    syntax = CallSyntax("[TOOL_CALLS]", "[", ", ", "]", markers=("[TOOL_CALLS]",))


class RewrittenParser(ToolParser):
    """A family whose calls are not JSON objects, read by rewriting each as one (call_rewrites.py) first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rewrite = self.rewriter()

    def rewriter(self):
        raise NotImplementedError

    def feed(self, text: str) -> list[ChatEvent]:
        return super().feed(self.rewrite.feed(text))

    def finish(self) -> list[ChatEvent]:
        self.buf += self.rewrite.feed("", final=True)
        return super().finish()


class MistralArgsParser(RewrittenParser):
    """Newer Mistral tokenizers (Mistral Small 3.2, Magistral, Devstral): [TOOL_CALLS]name[ARGS]{...}, each call
    after a [TOOL_CALLS] of its own."""

    family = "mistral_args"
    open = "[TOOL_CALLS]"
    sep = "[TOOL_CALLS]"
    syntax = CallSyntax(
        "[TOOL_CALLS]", "", "[TOOL_CALLS]", "", markers=("[TOOL_CALLS]", "[ARGS]"), args_marker="[ARGS]"
    )

    def rewriter(self) -> ArgsMarkerCalls:
        return ArgsMarkerCalls(self.open, self.syntax.args_marker)


class Qwen3CoderParser(RewrittenParser):
    """Qwen3-Coder: <tool_call>, then <function=NAME> holding <parameter=KEY> VALUE </parameter> elements, each on
    lines of their own, then </function> and </tool_call>; one block per call. A value's JSON type comes from its
    parameter's schema."""

    family = "qwen3_coder"
    open = "<tool_call>"
    close = "</tool_call>"
    syntax = replace(HermesParser.syntax, bare=False, xml=True)

    def rewriter(self) -> XmlCalls:
        return XmlCalls(self.open, self.schemas)


class Llama3Parser(ToolParser):
    """Llama 3.x JSON calls: the whole output is {"name": ..., "parameters": {...}}; several are joined by ';'."""

    family = "llama3"
    alt_open = "<|python_tag|>"
    sep = ";"
    syntax = CallSyntax("", "", "; ", "", "parameters", markers=("<|python_tag|>",), lead="<|python_tag|>")


PARSERS: dict[str, type[ToolParser]] = {
    p.family: p for p in (HermesParser, Llama3Parser, MistralParser, MistralArgsParser, Qwen3CoderParser)
}


def parse_all(parser: ToolParser, text: str) -> list[ChatEvent]:
    """One-shot parse of a whole output; the streamed events of the same text concatenate to the same."""
    return parser.feed(text) + parser.finish()
