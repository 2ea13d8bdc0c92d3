"""Protocol-neutral chat: ChatRequest in, a stream of ChatEvents (TextDelta, Finish) out.

Protocol adapters build a ChatRequest, call prepare() (which checks everything that can fail before
a response starts), then turn events() into their own wire format.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmchat.engine import Engine, Sequence
from llmchat.sampling import SamplingParams


class ChatError(Exception):
    """A request the model cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class GenerationError(Exception):
    """The engine failed while generating; the response is already under way."""


@dataclass(slots=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str


@dataclass(slots=True)
class ChatRequest:
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_tools: int = 0


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class Finish:
    reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


ChatEvent = TextDelta | Finish


@dataclass(slots=True)
class PreparedChat:
    prompt_ids: list[int]
    params: SamplingParams

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _render(engine: Engine, messages: list[ChatMessage]) -> list[int]:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    rendered = engine.tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(rendered["input_ids"])


async def prepare(engine: Engine, request: ChatRequest) -> PreparedChat:
    """Tokenizes the conversation (off the event loop) and checks it fits the context."""
    prompt_ids = await asyncio.to_thread(_render, engine, request.messages)
    room = engine.max_context - len(prompt_ids)
    if room <= 0:
        raise ChatError(
            f"The prompt is {len(prompt_ids)} tokens, which leaves no room in this model's context of "
            f"{engine.max_context} tokens. Shorten the messages.",
            "messages",
            "context_length_exceeded",
        )
    if request.max_tokens is not None and request.max_tokens > room:
        raise ChatError(
            f"max_tokens is {request.max_tokens}, but the prompt is {len(prompt_ids)} tokens and the context is "
            f"{engine.max_context}, so at most {room} tokens can be generated. "
            "Lower max_tokens or shorten the messages.",
            "max_tokens",
            "context_length_exceeded",
        )
    params = SamplingParams(
        max_tokens=request.max_tokens or room,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop,
    )
    return PreparedChat(prompt_ids, params)


def start(engine: Engine, prepared: PreparedChat) -> Sequence:
    """Queues the generation; raises QueueFull when the engine's waiting queue is at its bound.

    Separate from events() so the caller can refuse the request before a response starts.
    """
    return engine.submit(prepared.prompt_ids, prepared.params)


async def events(engine: Engine, seq: Sequence) -> AsyncIterator[ChatEvent]:
    """Yields text deltas, then one Finish; leaving early aborts the generation."""
    async for output in engine.stream(seq):
        if output.error is not None:
            raise GenerationError(output.error)
        if output.text:
            yield TextDelta(output.text)
        if output.finish_reason is not None:
            yield Finish(output.finish_reason, seq.num_prompt_tokens, output.num_completion_tokens)
