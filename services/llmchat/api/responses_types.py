"""OpenAI Responses API request models (POST /v1/responses); field names are the JSON keys.

Input items, content parts and tools the server cannot serve parse into catch-all models, so the
adapter can refuse them with a 400 that names the limitation instead of a bare schema mismatch.
"""

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from llmchat.api.openai_types import FunctionDefinition, WireModel


class TextPart(WireModel):
    # output_text parts come back when a client replays an assistant message from an earlier response.
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class OtherPart(WireModel):
    """input_image, input_file, input_audio, refusal...: refused by the adapter."""

    type: str


def _part_kind(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return "text" if kind in ("input_text", "output_text") else "other"


Part = Annotated[Annotated[TextPart, Tag("text")] | Annotated[OtherPart, Tag("other")], Discriminator(_part_kind)]


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Part]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Part]
    id: str | None = None
    status: str | None = None


class ReasoningItem(WireModel):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = []
    content: list[Any] | None = None
    encrypted_content: str | None = None


class OtherItem(WireModel):
    """item_reference, web_search_call, computer_call...: refused by the adapter."""

    type: str


_ITEM_KINDS = {"message", "function_call", "function_call_output", "reasoning"}


def _item_kind(item: Any) -> str:
    # Easy input messages ({"role", "content"}) may leave out the type.
    kind = (item.get("type") if isinstance(item, dict) else getattr(item, "type", None)) or "message"
    return kind if kind in _ITEM_KINDS else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_kind),
]


class FunctionTool(FunctionDefinition):
    """A function tool in the Responses API's flat shape: name and parameters beside the type."""

    type: Literal["function"]


class OtherTool(WireModel):
    """web_search, file_search, code_interpreter, mcp...: refused by the adapter."""

    type: str


def _tool_kind(tool: Any) -> str:
    kind = tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None)
    return "function" if kind == "function" else "other"


ToolParam = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")], Discriminator(_tool_kind)
]


class NamedFunctionChoice(WireModel):
    type: Literal["function"]
    name: str


class TextFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a format of type json_schema needs a name and a schema")
        return self


class TextConfig(WireModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(WireModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(WireModel):
    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[ToolParam] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: bool | None = Field(None, description="Accepted, but nothing is stored: responses say store false.")
    previous_response_id: str | None = Field(None, description="Refused: the server is stateless.")
    conversation: str | dict[str, Any] | None = Field(None, description="Refused: the server is stateless.")
    background: bool | None = Field(None, description="Refused: background responses need storage.")
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
