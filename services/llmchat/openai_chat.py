"""OpenAI Chat Completions adapter: wire request -> ChatRequest, ChatEvents -> chunks or one response."""

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.completion_usage import CompletionUsage

from llmchat.chat import ChatError, ChatEvent, ChatMessage, ChatRequest, Finish, TextDelta
from llmchat.openai_types import ChatCompletionRequest

# OpenAI's "developer" role is the newer name for "system"; chat templates only know the latter.
_ROLES = {"developer": "system"}


def to_chat_request(body: ChatCompletionRequest) -> ChatRequest:
    if body.tools and body.tool_choice != "none":
        raise ChatError("Tool calling is not supported by this server yet; send the request without tools.", "tools")
    if body.logprobs:
        raise ChatError("logprobs are not supported by this server.", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise ChatError(f"{name} is not supported by this server; leave it at 0.", name)
    return ChatRequest(
        messages=[ChatMessage(_ROLES.get(m.role, m.role), m.text()) for m in body.messages],
        max_tokens=body.completion_limit(),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        num_tools=len(body.tools or ()),
    )


@dataclass(slots=True)
class ResponseInfo:
    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _usage(finish: Finish) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )


async def to_response(events: AsyncIterator[ChatEvent], info: ResponseInfo) -> tuple[ChatCompletion, Finish]:
    parts: list[str] = []
    finish = None
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            finish = event
    assert finish is not None, "chat events always end with Finish"
    response = ChatCompletion(
        id=info.id,
        object="chat.completion",
        created=info.created,
        model=info.model,
        choices=[
            Choice(
                index=0,
                message=ChatCompletionMessage(role="assistant", content="".join(parts), refusal=None),
                finish_reason=finish.reason,
                logprobs=None,
            )
        ],
        usage=_usage(finish),
    )
    return response, finish


def _chunk(info: ResponseInfo, delta: ChoiceDelta | None, finish_reason=None, usage=None, include_usage=False) -> str:
    chunk = ChatCompletionChunk(
        id=info.id,
        object="chat.completion.chunk",
        created=info.created,
        model=info.model,
        choices=[]
        if delta is None
        else [ChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=None)],
    )
    if include_usage:
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        chunk.usage = usage
    return chunk.model_dump_json(exclude_unset=True)


async def stream_chunks(
    events: AsyncIterator[ChatEvent], info: ResponseInfo, include_usage: bool
) -> AsyncIterator[str | Finish]:
    """Yields the JSON of each chunk, in order: role, content deltas, finish_reason, usage.

    The Finish event is passed through too (after the finish chunk) so the caller can record it.
    """
    yield _chunk(info, ChoiceDelta(role="assistant"), include_usage=include_usage)
    async for event in events:
        if isinstance(event, TextDelta):
            yield _chunk(info, ChoiceDelta(content=event.text), include_usage=include_usage)
            continue
        yield _chunk(info, ChoiceDelta(), finish_reason=event.reason, include_usage=include_usage)
        if include_usage:
            yield _chunk(info, None, usage=_usage(event), include_usage=True)
        yield event
