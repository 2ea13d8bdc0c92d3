"""OpenAI legacy text completions: POST /v1/completions -> a raw-prompt ChatRequest (no chat template),
ChatEvents -> one text_completion or its chunks."""

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi import Response as HTTPResponse
from fastapi.responses import JSONResponse
from openai.types import Completion, CompletionChoice
from openai.types.completion_choice import Logprobs as ChoiceLogprobs
from pydantic import Field

from hrserve import client_job_id
from llmchat.chat import ChatError, ChatEvent, ChatRequest, Finish, Logprobs, TextDelta
from llmchat.openai_chat import completion_usage
from llmchat.openai_types import INT64_MAX, INT64_MIN, StreamOptions, WireModel
from llmchat.serving import Serving, SSEvents, openai_sse_error

_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
COMPLETIONS_200 = {
    "description": "A text_completion object, or with `stream: true` server-sent text_completion chunks.",
    "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}},
}


class CompletionRequest(WireModel):
    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="One text prompt.")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default, 16; null for the rest of the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    best_of: int | None = Field(None, ge=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    echo: bool = False
    suffix: str | None = Field(None, description="Not supported.")
    logprobs: int | None = Field(None, ge=0, le=5)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None


@dataclass(slots=True)
class CompletionInfo:
    model: str
    echo: str = ""  # the prompt, when the request asks to have it in front of the completion
    logprobs: bool = False  # the request asked for them
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def to_chat_request(body: CompletionRequest) -> ChatRequest:
    """The protocol-neutral request; raises ChatError (a 400) for anything that cannot be honoured."""
    if body.n > 1 or (body.best_of or 1) > 1:
        name = "n" if body.n > 1 else "best_of"
        raise ChatError(f"{name} > 1 is not supported: one completion per request. Send several requests.", name)
    if body.echo and body.logprobs is not None:
        # OpenAI would score the prompt's tokens too; this engine scores only what it generates.
        raise ChatError("echo with logprobs is not supported: prompt tokens are not scored.", "logprobs")
    if body.suffix:
        raise ChatError("suffix (insertion) is not supported by this server's model; leave it out.", "suffix")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise ChatError(f"{name} is not supported by this server; leave it at 0.", name)
    stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    return ChatRequest(
        messages=[],
        prompt=prompt_text(body),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        logprobs=body.logprobs,
    )


def prompt_text(body: CompletionRequest) -> str:
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(p, str) for p in prompt):
        raise ChatError("Only one prompt per request is supported; send one request per prompt.", "prompt")
    if not prompt:
        raise ChatError("The prompt is empty; send some text.", "prompt")
    raise ChatError("Prompts as token ids are not supported; send the prompt as text.", "prompt")


class LogprobsTable:
    """The legacy logprobs columns (tokens, token_logprobs, top_logprobs, text_offset), filled as tokens come."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset  # where the next token starts in the choice's text
        self.rows: list[tuple[str, float, dict[str, float], int]] = []

    def add(self, event: Logprobs) -> None:
        for t in event.tokens:
            self.rows.append((t.token, t.logprob, dict(t.top), self.offset))
            self.offset += len(t.token)

    def take(self) -> ChoiceLogprobs:
        rows, self.rows = self.rows, []
        return ChoiceLogprobs(
            tokens=[r[0] for r in rows],
            token_logprobs=[r[1] for r in rows],
            top_logprobs=[r[2] for r in rows],
            text_offset=[r[3] for r in rows],
        )


async def to_completion(events: AsyncIterator[ChatEvent], info: CompletionInfo) -> Completion:
    parts, finish, table = [info.echo], None, LogprobsTable()
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Logprobs):
            table.add(event)
        elif isinstance(event, Finish):
            finish = event
    assert finish is not None, "chat events always end with Finish"
    logprobs = table.take() if info.logprobs else None
    choice = CompletionChoice(text="".join(parts), index=0, logprobs=logprobs, finish_reason=finish.reason)
    return Completion(
        id=info.id,
        object="text_completion",
        created=info.created,
        model=info.model,
        choices=[choice],
        usage=completion_usage(finish),
    )


def _chunk(
    info: CompletionInfo,
    text: str | None,
    finish_reason=None,
    usage=None,
    include_usage=False,
    logprobs: ChoiceLogprobs | None = None,
) -> str:
    # The SDK's type requires finish_reason, but OpenAI streams null until the last chunk: built unvalidated.
    choice = CompletionChoice.model_construct(text=text, index=0, logprobs=logprobs, finish_reason=finish_reason)
    chunk = Completion(
        id=info.id,
        object="text_completion",
        created=info.created,
        model=info.model,
        choices=[] if text is None else [choice],
    )
    if include_usage:
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        chunk.usage = usage
    return chunk.model_dump_json(exclude_unset=True)


async def stream_chunks(events: AsyncIterator[ChatEvent], info: CompletionInfo, include_usage: bool) -> SSEvents:
    """Text chunks (the echoed prompt first), a last chunk with finish_reason, usage if asked, then [DONE]."""
    if info.echo:
        yield {"data": _chunk(info, info.echo, include_usage=include_usage)}
    # A chunk's logprobs are those of the tokens sampled since the last chunk (text may be held back a while).
    table = LogprobsTable()
    async for event in events:
        if isinstance(event, Logprobs):
            table.add(event)
        elif isinstance(event, TextDelta) and event.text:
            logprobs = table.take() if info.logprobs else None
            yield {"data": _chunk(info, event.text, include_usage=include_usage, logprobs=logprobs)}
        elif isinstance(event, Finish):
            logprobs = table.take() if info.logprobs and table.rows else None
            yield {"data": _chunk(info, "", event.reason, include_usage=include_usage, logprobs=logprobs)}
            if include_usage:
                yield {"data": _chunk(info, None, usage=completion_usage(event), include_usage=True)}
    yield {"data": "[DONE]"}


def _json(completion: Completion) -> dict:
    return completion.model_dump(mode="json", exclude_unset=True)


def router(serving: Serving) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions", response_model=None, responses={200: COMPLETIONS_200})
    async def completions(
        body: CompletionRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> JSONResponse | HTTPResponse:
        info = CompletionInfo(serving.runtime.model_name, logprobs=body.logprobs is not None)
        run = await serving.start(
            request,
            body.model,
            lambda: to_chat_request(body),
            response_id=info.id,
            stream=body.stream,
            job_id=job_id,
            operation="text_completion",
        )
        info.echo = prompt_text(body) if body.echo else ""  # valid now: start() built the request from it
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return run.stream(lambda events: stream_chunks(events, info, include_usage), openai_sse_error)
        return await run.reply(request, lambda events: to_completion(events, info), _json)

    return api
