"""Protocol-neutral chat, between the wire protocols (llmchat.api) and the engine (llmchat.engine).

A ChatRequest goes in (messages and tools, or a raw prompt); Chat renders it with the chat template,
constrains tool calls and JSON with a grammar, and turns the engine's tokens into a stream of
ChatEvents: text, reasoning, tool calls, log-probabilities and a Finish with the token counts.
"""

from llmchat.chat.core import Chat, PreparedChat
from llmchat.chat.events import (
    ChatEvent,
    Finish,
    Logprobs,
    Notice,
    ReasoningDelta,
    TextDelta,
    ToolCallCut,
    ToolCallDelta,
    ToolCallStart,
)
from llmchat.chat.prompt import CallRecord, ChatMessage
from llmchat.chat.request import ChatError, ChatOptions, ChatRequest, GenerationError
from llmchat.chat.toolcalls import ToolSpec

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
    "Logprobs",
    "Notice",
    "PreparedChat",
    "ReasoningDelta",
    "TextDelta",
    "ToolCallCut",
    "ToolCallDelta",
    "ToolCallStart",
    "ToolSpec",
]
