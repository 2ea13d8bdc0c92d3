"""Anthropic Messages request models; field names are the JSON keys and limits live in Field().

Responses are built from the anthropic SDK's own types (see anthropic_messages.py).
"""

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from llmchat.api.openai_types import WireModel


class Block(WireModel):
    # Prompt caching hints are accepted and ignored: there is no prompt cache to steer.
    cache_control: dict[str, Any] | None = None


class TextBlock(Block):
    type: Literal["text"]
    text: str
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ThinkingBlock(Block):
    """Earlier reasoning sent back by a client; like Anthropic, later turns do not see it."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None  # redacted_thinking's


class OtherBlock(Block):
    """Images, documents and the rest: refused by the adapter with a message that names the block."""

    type: str


_KNOWN = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


def _kind(block: Any) -> str:
    # Unknown block types get their own model, so the refusal can say what they were instead of
    # pydantic listing every tag it expected.
    kind = block.get("type") if isinstance(block, dict) else getattr(block, "type", None)
    if kind in ("thinking", "redacted_thinking"):
        return "thinking"
    return kind if kind in _KNOWN else "other"


# What a tool result may hold: text (images and documents are refused by the adapter).
ResultBlock = Annotated[
    Annotated[TextBlock, Tag("text")] | Annotated[OtherBlock, Tag("other")],
    Discriminator(lambda block: "text" if _kind(block) == "text" else "other"),
]


class ToolResultBlock(Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultBlock] | None = None
    is_error: bool = False


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_kind),
]


class Message(WireModel):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlock], Field(min_length=1)]


class Tool(WireModel):
    # Anthropic's pattern, plus dots: function-calling data sets and OpenAI-format clients name tools math.sqrt.
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    # Optional here so that a server tool (which has none) is refused for what it is, not for this.
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; server tools (web_search_..., bash_...) are refused
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _tool_named(self):
        if self.type == "tool" and not self.name:
            raise ValueError("a tool_choice of type 'tool' needs the name of the tool to call")
        return self


class Thinking(WireModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(WireModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(WireModel):
    format: OutputFormat | None = None
    effort: str | None = None  # accepted; it has no counterpart here


class MessagesInput(WireModel):
    """What a prompt is made of: the body of /v1/messages/count_tokens, and part of every request."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None


class MessagesRequest(MessagesInput):
    max_tokens: int = Field(ge=1)
    # Current anthropic SDKs no longer offer the sampling fields; other clients still send them.
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None  # user_id only; accepted, not used
