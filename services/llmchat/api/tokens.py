"""vLLM's utility endpoints beside the protocols: POST /tokenize (a raw prompt, or messages through the chat
template exactly as a chat request renders them), POST /detokenize and GET /version, in vLLM's shapes."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from hrserve import bad_request
from llmchat import __version__
from llmchat.api.openai_chat import chat_message, chat_tools
from llmchat.api.openai_types import Message, Tool, WireModel
from llmchat.api.serving import Serving, invalid
from llmchat.chat import ChatError, ChatRequest

# Beside /v1/*, the paths whose errors /openapi.json documents (hrserve.auth.PROTECTED puts them behind the keys).
PATHS = ("/tokenize", "/detokenize")


class TokenizeRequest(WireModel):
    """vLLM's two requests in one: `prompt` (raw text) or `messages` (a conversation through the chat template)."""

    # The schema says what the validator checks: one of the two, not both.
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: str | None = Field(None, min_length=1, description="The served model's name, if given.")
    prompt: str | None = Field(None, description="Text tokenized as is, without the chat template.")
    messages: list[Message] | None = Field(
        None, min_length=1, description="A conversation, rendered by the chat template as a chat request renders it."
    )
    add_special_tokens: bool | None = Field(
        None,
        description="Add the tokenizer's special tokens (a BOS, for Llama). Default: true for a prompt, false for "
        "messages (the chat template writes its own).",
    )
    add_generation_prompt: bool = Field(True, description="With messages; only true: chat requests end with it.")
    continue_final_message: bool = Field(False, description="With messages; only false: prefill is not supported.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="With messages: template variables.")
    tools: list[Tool] | None = Field(None, max_length=128, description="With messages: tools for the template.")
    return_token_strs: bool | None = Field(False, description="Also return each token's string.")

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if self.prompt is not None and self.messages is not None:
            raise PydanticCustomError("prompt_or_messages", "Send prompt or messages, not both.")
        if self.prompt is None and self.messages is None:
            raise PydanticCustomError("prompt_or_messages", "Send prompt (text) or messages (a conversation).")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="The model's context length in tokens.")
    tokens: list[int]
    token_strs: list[str] | None = Field(description="With return_token_strs: each token's string, else null.")


class DetokenizeRequest(WireModel):
    model: str | None = Field(None, min_length=1, description="The served model's name, if given.")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="Token ids of this model's vocabulary.")


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


# The fields that shape how messages are rendered, and their defaults: a prompt takes none of them, and the
# first two cannot change (rendering ends with the generation prompt, as a chat request's does).
CHAT_ONLY = {
    "add_generation_prompt": True,
    "continue_final_message": False,
    "chat_template_kwargs": None,
    "tools": None,
}


def chat_request(body: TokenizeRequest) -> ChatRequest:
    """The prompt, or the conversation as a chat request would carry it; raises ChatError (a 400) for what
    cannot be rendered."""
    if body.prompt is not None:
        for name, default in CHAT_ONLY.items():
            if getattr(body, name) != default:
                raise ChatError(f"{name} applies to messages only; leave it out with a prompt.", name)
        return ChatRequest([], prompt=body.prompt)
    for name in ("add_generation_prompt", "continue_final_message"):
        if (value := getattr(body, name)) != CHAT_ONLY[name]:
            raise ChatError(
                f"{name}={str(value).lower()} is not supported: messages are rendered as a chat request renders "
                f"them, ending with the generation prompt (no prefill). Leave {name} out.",
                name,
            )
    messages = [chat_message(m, i) for i, m in enumerate(body.messages or ())]
    return ChatRequest(messages, tools=chat_tools(body.tools), template_kwargs=dict(body.chat_template_kwargs or {}))


def router(serving: Serving) -> APIRouter:
    api = APIRouter()
    runtime = serving.runtime

    @api.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """A prompt's token ids: raw text as is, or messages through the chat template exactly as a chat request
        renders them (its `count` is then the request's `usage.prompt_tokens`)."""
        if body.model is not None:
            serving.check_model(body.model)
        chat = runtime.require_chat()
        try:
            ids = await chat.tokenize(chat_request(body), body.add_special_tokens)
        except ChatError as exc:
            raise invalid(exc) from None
        strs = chat.renderer.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=chat.engine.max_context, tokens=ids, token_strs=strs)

    @api.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids, special tokens included."""
        if body.model is not None:
            serving.check_model(body.model)
        engine = runtime.require_engine()
        tokenizer = engine.tokenizer
        # Ids past the tokenizer's have no text, and ids past the model's embedding are no token of this model.
        size = min(engine.vocab_size, len(tokenizer))
        if max(body.tokens, default=0) >= size:
            i, token = next((i, t) for i, t in enumerate(body.tokens) if t >= size)
            raise bad_request(
                f"tokens.{i} is {token}, which is not in this model's vocabulary: ids run from 0 to {size - 1}.",
                f"tokens.{i}",
            )
        return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))

    @api.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        """llmchat's version."""
        return VersionResponse(version=__version__)

    return api
