"""OpenAI Chat Completions adapter: POST /v1/chat/completions. Wire request -> ChatRequest; ChatEvents ->
chat.completion.chunk events, and the chat.completion folded from the same state."""

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message_tool_call import Function
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from pydantic import BaseModel

from hrserve import OPENAI, ServiceError, client_job_id
from llmchat.api.common import (
    DONE,
    ROLES,
    ToolSet,
    chunk_usage,
    completion_usage,
    include_usage,
    response_format,
    tool_choice,
)
from llmchat.api.openai_types import ChatCompletionRequest, Message, NamedToolChoice, Tool
from llmchat.api.openapi import JsonText, ok_responses
from llmchat.api.sampling_fields import apply_sampling, apply_structured
from llmchat.api.serving import Reply, Serving, WireEvent
from llmchat.chat import (
    CallRecord,
    ChatError,
    ChatEvent,
    ChatMessage,
    ChatRequest,
    Finish,
    Logprobs,
    ReasoningDelta,
    TextDelta,
    ToolCallCut,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
)

# The chat core's field names, as this protocol names them.
NAMES = {"output_format": "response_format"}


def to_chat_request(body: ChatCompletionRequest) -> ChatRequest:
    """The protocol-neutral request; raises ChatError (a 400) for anything that cannot be honoured."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ChatError("top_logprobs needs logprobs: true.", "top_logprobs")
    tools = chat_tools(body.tools)
    choice, tool_name = _tool_choice(body, tools)
    request = ChatRequest(
        messages=[chat_message(m, i) for i, m in enumerate(body.messages)],
        max_tokens=body.completion_limit(),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=body.parallel_tool_calls,
        reasoning_effort=body.reasoning_effort,
        template_kwargs=dict(body.chat_template_kwargs or {}),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    apply_sampling(body, request, {"echo": (None, False)})
    response_format(body.response_format, request)
    apply_structured(body, request)
    return request


def chat_message(m: Message, i: int) -> ChatMessage:
    """One wire message as the chat core's (also /tokenize's)."""
    for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
        if part.type != "text":
            raise ChatError(
                f"This server serves a text-only model; {part.type} parts are not supported. Send text parts only.",
                f"messages.{i}.content.{j}",
            )
    calls = []
    for j, call in enumerate(m.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ChatError(
                "A tool call's arguments must be a JSON object encoded as a string, as the server returned it.",
                f"messages.{i}.tool_calls.{j}.function.arguments",
            )
        calls.append(CallRecord(call.id, call.function.name, call.function.arguments))
    return ChatMessage(ROLES.get(m.role, m.role), m.text(), tuple(calls), m.tool_call_id)


def chat_tools(offered: list[Tool] | None) -> tuple[ToolSpec, ...]:
    """The request's tools as the chat core's (also /tokenize's)."""
    tools = ToolSet()
    for i, tool in enumerate(offered or ()):
        f = tool.function
        tools.add(f.name, f.description, f.parameters, f"tools.{i}.function", "parameters")
    return tools.done()


def _tool_choice(body: ChatCompletionRequest, tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tool_choice("function", choice.function.name, tools)
    return tool_choice(choice, None, tools)


class ChoiceState:
    """What one choice has said so far: text, reasoning, calls and log-probabilities, and how it ended."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ChatCompletionMessageToolCall] = []
        self.cut: set[int] = set()  # calls the output ended inside: streamed, but left out of the whole message
        self.all_logprobs: list[ChatCompletionTokenLogprob] = []
        # Log-probabilities ride on the next chunk that carries output (text may be held back a while).
        self.pending: list[ChatCompletionTokenLogprob] = []
        self.finish: Finish | None = None

    def delta(self, event: ChatEvent) -> ChoiceDelta | None:
        """Keeps the event; the chunk delta it streams as (None: nothing to stream)."""
        if isinstance(event, Logprobs):
            tokens = _token_logprobs(event)
            self.all_logprobs += tokens
            self.pending += tokens
        elif isinstance(event, TextDelta):
            self.parts.append(event.text)
            return ChoiceDelta(content=event.text)
        elif isinstance(event, ReasoningDelta):
            self.reasoning.append(event.text)
            return ChoiceDelta(reasoning_content=event.text, reasoning=event.text)
        elif isinstance(event, ToolCallStart):
            function = Function(name=event.name, arguments="")
            self.calls.append(ChatCompletionMessageToolCall(id=event.id, type="function", function=function))
            return ChoiceDelta(tool_calls=[_call_delta(event)])
        elif isinstance(event, ToolCallDelta):
            self.calls[event.index].function.arguments += event.arguments
            return ChoiceDelta(tool_calls=[_call_delta(event)])
        elif isinstance(event, ToolCallCut):
            self.cut.add(event.index)
        return None

    def message(self) -> ChatCompletionMessage:
        parts, reasoning = self.parts, self.reasoning
        # A call cut by max_tokens has arguments that are not JSON; clients (LiteLLM, agent SDKs) parse every
        # call they are handed, so the whole message leaves it out and finish_reason "length" tells why.
        calls = [call for index, call in enumerate(self.calls) if index not in self.cut]
        # OpenAI sends content null, not "", when the reply is only tool calls (vLLM too when it is only reasoning).
        content = "".join(parts) if parts or not (calls or reasoning) else None
        # Not in OpenAI's schema (the SDK keeps extra fields): DeepSeek's API and older vLLM name it
        # reasoning_content, newer vLLM and OpenRouter reasoning; clients read one or the other.
        extra = dict.fromkeys(("reasoning_content", "reasoning"), "".join(reasoning)) if reasoning else {}
        message = ChatCompletionMessage(role="assistant", content=content, refusal=None, **extra)
        if calls:
            message.tool_calls = calls
        return message


class ChatReply(Reply):
    """Chat events -> chat.completion.chunk objects (each choice's role first, then deltas, its finish_reason;
    usage if asked once every choice ended), while collecting the same for the whole chat.completion."""

    def __init__(self, model: str, logprobs: bool = False, include_usage: bool = False, n: int = 1) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.logprobs, self.include_usage = model, logprobs, include_usage
        self.choices = [ChoiceState() for _ in range(n)]

    def start(self, num_prompt_tokens: int) -> list[WireEvent]:
        return [self._chunk(i, ChoiceDelta(role="assistant")) for i in range(len(self.choices))]

    def feed(self, event: ChatEvent, choice: int = 0) -> list[WireEvent]:
        state = self.choices[choice]
        if isinstance(event, Finish):
            state.finish = event
            out = [self._chunk(choice, ChoiceDelta(), event.reason)]
            if self.include_usage and all(c.finish for c in self.choices):
                out.append(chunk_usage(self._chunk_of([]), True, completion_usage(*(c.finish for c in self.choices))))
            return out
        delta = state.delta(event)
        return [] if delta is None else [self._chunk(choice, delta)]

    def close(self) -> list[WireEvent]:
        return [DONE]

    def _chunk(self, index: int, delta: ChoiceDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        state = self.choices[index]
        logprobs, state.pending = state.pending, []
        choice_logprobs = ChunkLogprobs(content=logprobs, refusal=None) if logprobs else None
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=choice_logprobs)
        return chunk_usage(self._chunk_of([choice]), self.include_usage)

    def _chunk_of(self, choices: list[ChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model, choices=choices
        )

    def response(self) -> ChatCompletion:
        assert all(c.finish for c in self.choices), "chat events always end with Finish"
        choices = [
            Choice(
                index=i,
                message=state.message(),
                finish_reason=state.finish.reason,
                logprobs=ChoiceLogprobs(content=state.all_logprobs, refusal=None) if self.logprobs else None,
            )
            for i, state in enumerate(self.choices)
        ]
        return ChatCompletion(
            id=self.id,
            object="chat.completion",
            created=self.created,
            model=self.model,
            choices=choices,
            usage=completion_usage(*(c.finish for c in self.choices)),
        )

    def stream_error(self, error: ServiceError) -> list[dict]:
        return openai_stream_error(error)


def openai_stream_error(error: ServiceError) -> list[dict]:
    """OpenAI's in-band stream error (chat and completions): the status line is gone, so the envelope goes in a
    data event and the stream ends as usual."""
    return [{"data": json.dumps(error.body())}, {"data": DONE}]


def _token_logprobs(event: Logprobs) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.token.encode()),
            top_logprobs=[TopLogprob(token=token, logprob=lp, bytes=list(token.encode())) for token, lp in t.top],
        )
        for t in event.tokens
    ]


def _call_delta(event: ToolCallStart | ToolCallDelta) -> ChoiceDeltaToolCall:
    """The first delta of a call carries its id, type and name; later ones only argument fragments."""
    if isinstance(event, ToolCallStart):
        function = ChoiceDeltaToolCallFunction(name=event.name, arguments="")
        return ChoiceDeltaToolCall(index=event.index, id=event.id, type="function", function=function)
    return ChoiceDeltaToolCall(index=event.index, function=ChoiceDeltaToolCallFunction(arguments=event.arguments))


# Never built: it describes the stream's events in /openapi.json (its docstring is the schema's description).
class ChatCompletionSSE(BaseModel):
    """One server-sent event of a streamed chat completion: a chat.completion.chunk, an error (after the
    status line went out), or the closing [DONE]."""

    data: Annotated[ChatCompletionChunk, JsonText((OPENAI.name,))] | Literal["[DONE]"]


def router(serving: Serving) -> APIRouter:
    api = APIRouter()
    ok = ok_responses(
        "A chat.completion object, or with `stream: true` server-sent chat.completion.chunk events.",
        ChatCompletion,
        ChatCompletionSSE,
    )

    @api.post("/v1/chat/completions", response_model=None, responses=ok)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, job_id: str | None = Depends(client_job_id)
    ) -> Response:
        reply = ChatReply(serving.runtime.model_name, body.logprobs, include_usage(body.stream_options), body.n)
        return await serving.respond(
            request,
            model=body.model,
            build=lambda: to_chat_request(body),
            reply=reply,
            stream=body.stream,
            job_id=job_id,
            names=NAMES,
        )

    return api
