"""The events of one generation, shared by every protocol adapter: text, reasoning, tool calls, notices, finish."""

from dataclasses import dataclass

from llmchat.engine.sampling import TokenLogprob


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    """A fragment of the model's reasoning (its <think> block), kept apart from the answer."""

    text: str


@dataclass(slots=True)
class ToolCallStart:
    """A tool call begins: its position among this response's calls, its id and the function's name."""

    index: int
    id: str
    name: str


@dataclass(slots=True)
class ToolCallDelta:
    """A fragment of a call's arguments (JSON text); a call's fragments concatenate to its arguments."""

    index: int
    arguments: str


@dataclass(slots=True)
class ToolCallCut:
    """The output ended inside this call (max_tokens or a stop string), so its arguments are not whole JSON.
    A stream has already sent its fragments; whole responses leave the call out."""

    index: int
    message: str
    name = "tool_call.unterminated"  # the span event that records it
    expected = False  # logged as a warning, like a Notice that is not routine


@dataclass(slots=True)
class Notice:
    """Something worth recording on the request's span (a rejected tool call); never sent to clients.
    `expected` marks a routine one (a reply ended at a repeated call), logged at info rather than warning."""

    name: str
    message: str
    expected: bool = False


@dataclass(slots=True)
class Logprobs:
    """Log-probabilities of the tokens behind the text events that follow (only when a request asks)."""

    tokens: list[TokenLogprob]


@dataclass(slots=True)
class Finish:
    reason: str  # stop | length | tool_calls
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None  # the request's stop string that ended generation
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (part of prompt_tokens)
    model_steps: int = 0  # forward passes whose logits chose a token (fewer than completion_tokens when forced)
    reasons: list[str] | None = None  # n > 1: every choice's reason (`reason` is the first's)


ChatEvent = TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | ToolCallCut | Notice | Logprobs | Finish
