"""OpenAI Chat Completions request models; field names are the JSON keys and limits live in Field().

Responses are built from the openai SDK's own types (see openai_chat.py).
"""

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("llmchat.openai")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class WireModel(BaseModel):
    """Accepts fields we do not know (clients send many) but logs them, once per request."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown(self):
        if self.model_extra:
            log.info("ignoring unknown %s fields: %s", type(self).__name__, sorted(self.model_extra))
        return self


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class MediaPart(WireModel):
    """An image, audio or file part: known here only so the refusal can name it (the model reads text only)."""

    type: Literal["image_url", "input_audio", "file"]
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


ContentPart = Annotated[TextPart | MediaPart, Field(discriminator="type")]


class FunctionCall(WireModel):
    name: str
    arguments: str


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _tool_fields_fit_role(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""


class FunctionDefinition(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class StreamOptions(WireModel):
    include_usage: bool = False


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of its kinds."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(WireModel):
    """The fields chat and completions both take beyond temperature, top_p, stop and seed."""

    # Bounded here too (the most LLMCHAT_MAX_N may be), so no reply is sized by an absurd n before the check.
    n: int = Field(1, ge=1, le=128, description="Choices from one prefill of the prompt (at most the server's max_n).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias, -100 to 100.")
    top_k: int | None = Field(None, ge=-1, description="vLLM: 0 or -1 keeps every token.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    allowed_token_ids: list[int] | None = Field(None, min_length=1, description="Only these tokens may be generated.")
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=64, description="Words never written, alone or after a space."
    )
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, bias: dict[str, float] | None):
        for key, value in (bias or {}).items():
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias[{key!r}] is {value}; a bias must be between -100 and 100")
        return bias


class ChatCompletionRequest(SamplingFields):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Variables for the model's chat template, such as enable_thinking."
    )

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
