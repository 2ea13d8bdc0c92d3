"""The events of one generation, shared by every protocol adapter: text, tool calls, notices, finish."""

from dataclasses import dataclass


@dataclass(slots=True)
class TextDelta:
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
class Notice:
    """Something worth recording on the request's span (a rejected tool call); never sent to clients."""

    name: str
    message: str


@dataclass(slots=True)
class Finish:
    reason: str  # stop | length | tool_calls
    prompt_tokens: int
    completion_tokens: int


ChatEvent = TextDelta | ToolCallStart | ToolCallDelta | Notice | Finish
