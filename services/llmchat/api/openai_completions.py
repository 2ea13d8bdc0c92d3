"""OpenAI legacy text completions: POST /v1/completions -> a raw-prompt ChatRequest (no chat template),
ChatEvents -> one text_completion or its chunks."""

import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from openai.types import Completion, CompletionChoice
from openai.types.completion_choice import Logprobs as ChoiceLogprobs
from pydantic import BaseModel, Field

from hrserve import OPENAI, ServiceError, client_job_id
from llmchat.api.common import DONE, chunk_usage, completion_usage, include_usage, response_format
from llmchat.api.openai_chat import openai_stream_error
from llmchat.api.openai_types import INT64_MAX, INT64_MIN, ResponseFormat, SamplingFields, StreamOptions
from llmchat.api.openapi import JsonText, ok_responses
from llmchat.api.sampling_fields import apply_sampling, apply_structured
from llmchat.api.serving import Reply, Serving, WireEvent
from llmchat.chat import ChatError, ChatEvent, ChatRequest, Finish, Logprobs, TextDelta


class CompletionRequest(SamplingFields):
    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="One text prompt.")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default, 16; null for the rest of the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    best_of: int | None = Field(None, ge=1, description="Only n (or null): every candidate is returned.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    echo: bool = False
    suffix: str | None = Field(None, description="Not supported.")
    logprobs: int | None = Field(None, ge=0, le=5)
    response_format: ResponseFormat | None = Field(None, description="vLLM's: JSON output for a raw prompt.")
    user: str | None = None


def to_chat_request(body: CompletionRequest) -> ChatRequest:
    """The protocol-neutral request; raises ChatError (a 400) for anything that cannot be honoured."""
    if body.best_of not in (None, body.n):
        # OpenAI would generate best_of and return the n likeliest; this server returns every candidate.
        raise ChatError(f"best_of must equal n ({body.n}) or be left out: every candidate is returned.", "best_of")
    if body.echo and body.logprobs is not None:
        # OpenAI would score the prompt's tokens too; this engine scores only what it generates.
        raise ChatError("echo with logprobs is not supported: prompt tokens are not scored.", "logprobs")
    if body.suffix:
        raise ChatError("suffix (insertion) is not supported by this server's model; leave it out.", "suffix")
    stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    request = ChatRequest(
        messages=[],
        prompt=prompt_text(body),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        logprobs=body.logprobs,
    )
    apply_sampling(body, request)
    response_format(body.response_format, request)
    apply_structured(body, request)
    return request


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


class CompletionChoiceState:
    """One choice's text, log-probabilities and finish."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        # A chunk's logprobs are those of the tokens sampled since the last chunk; the whole response has all.
        self.table, self.all = LogprobsTable(), LogprobsTable()
        self.finish: Finish | None = None


class CompletionReply(Reply):
    """Chat events -> text_completion chunks (each choice's echoed prompt first, text, a last chunk with its
    finish_reason; usage if asked once every choice ended, then [DONE]), while collecting the same for the whole."""

    def __init__(self, body: CompletionRequest, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body, self.model = body, model
        self.logprobs, self.include_usage = body.logprobs is not None, include_usage(body.stream_options)
        self.choices = [CompletionChoiceState() for _ in range(body.n)]

    def start(self, num_prompt_tokens: int) -> list[WireEvent]:
        # The request was built from the prompt by now, so it is valid text.
        echo = prompt_text(self.body) if self.body.echo else ""
        if not echo:
            return []
        for state in self.choices:
            state.parts.append(echo)
        return [self._chunk(i, echo) for i in range(len(self.choices))]

    def feed(self, event: ChatEvent, choice: int = 0) -> list[WireEvent]:
        state = self.choices[choice]
        if isinstance(event, Logprobs):
            state.table.add(event)
            state.all.add(event)
        elif isinstance(event, TextDelta) and event.text:
            state.parts.append(event.text)
            return [self._chunk(choice, event.text, logprobs=state.table.take() if self.logprobs else None)]
        elif isinstance(event, Finish):
            state.finish = event
            logprobs = state.table.take() if self.logprobs and state.table.rows else None
            out = [self._chunk(choice, "", event.reason, logprobs)]
            if self.include_usage and all(c.finish for c in self.choices):
                out.append(chunk_usage(self._completion([]), True, completion_usage(*(c.finish for c in self.choices))))
            return out
        return []

    def close(self) -> list[WireEvent]:
        return [DONE]

    def _chunk(self, index: int, text: str, finish_reason=None, logprobs: ChoiceLogprobs | None = None) -> Completion:
        # The SDK's type requires finish_reason, but OpenAI streams null until the last chunk: built unvalidated.
        choice = CompletionChoice.model_construct(
            text=text, index=index, logprobs=logprobs, finish_reason=finish_reason
        )
        return chunk_usage(self._completion([choice]), self.include_usage)

    def _completion(self, choices: list[CompletionChoice]) -> Completion:
        return Completion(id=self.id, object="text_completion", created=self.created, model=self.model, choices=choices)

    def response(self) -> Completion:
        assert all(c.finish for c in self.choices), "chat events always end with Finish"
        choices = [
            CompletionChoice(
                text="".join(state.parts),
                index=i,
                logprobs=state.all.take() if self.logprobs else None,
                finish_reason=state.finish.reason,
            )
            for i, state in enumerate(self.choices)
        ]
        completion = self._completion(choices)
        completion.usage = completion_usage(*(c.finish for c in self.choices))
        return completion

    def stream_error(self, error: ServiceError) -> list[dict]:
        return openai_stream_error(error)


# Never built, like the two below: they describe the stream's events in /openapi.json.
class CompletionChunkChoice(CompletionChoice):
    # OpenAI streams finish_reason null until the last chunk; the SDK's type, which its stream reader also
    # parses chunks into, says it is always set.
    finish_reason: Literal["stop", "length", "content_filter"] | None


class CompletionChunk(Completion):
    """A text_completion chunk: finish_reason is null until the last one."""

    choices: list[CompletionChunkChoice]


class CompletionSSE(BaseModel):
    """One server-sent event of a streamed completion: a text_completion chunk, an error (after the status
    line went out), or the closing [DONE]."""

    data: Annotated[CompletionChunk, JsonText((OPENAI.name,))] | Literal["[DONE]"]


def router(serving: Serving) -> APIRouter:
    api = APIRouter()
    ok = ok_responses(
        "A text_completion object, or with `stream: true` server-sent text_completion chunks.",
        Completion,
        CompletionSSE,
    )

    @api.post("/v1/completions", response_model=None, responses=ok)
    async def completions(
        body: CompletionRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> Response:
        return await serving.respond(
            request,
            model=body.model,
            build=lambda: to_chat_request(body),
            reply=CompletionReply(body, serving.runtime.model_name),
            stream=body.stream,
            job_id=job_id,
            operation="text_completion",
        )

    return api
