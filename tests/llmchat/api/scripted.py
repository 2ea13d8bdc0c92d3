"""Scripted chat events through a protocol's Reply without a model or a server: the server-sent events the
route would stream, read back by the official SDK from a mock transport, and the whole response."""

import asyncio
import importlib
from types import ModuleType

from pydantic import BaseModel

from llmchat.api.serving import stream_events, whole_response

MODEL = "scripted-model"


def replay(make_reply, chat_events, num_prompt_tokens: int = 7) -> tuple[list[dict], BaseModel]:
    """(the server-sent events, the whole response), each from a fresh reply fed the same events, through the
    functions the routes use. An event may be a (choice, event) pair; a bare one is choice 0's."""

    async def events():
        for event in chat_events:
            yield event if isinstance(event, tuple) else (0, event)

    async def run():
        sse = [item async for item in stream_events(make_reply(), events(), num_prompt_tokens)]
        return sse, await whole_response(make_reply(), events(), num_prompt_tokens)

    return asyncio.run(run())


def sdk_http(sdk: ModuleType) -> ModuleType:
    """The HTTP library an official SDK is built on: httpx, or httpx2 in newer releases."""
    base = importlib.import_module(f"{sdk.__name__}._base_client")
    return getattr(base, "httpx2", None) or base.httpx


def sdk_http_client(sdk: ModuleType, sse: list[dict]):
    """An HTTP client for an official SDK whose every request is answered with these server-sent events."""
    http = sdk_http(sdk)
    body = "".join(
        ("" if "event" not in item else f"event: {item['event']}\n") + f"data: {item['data']}\n\n" for item in sse
    )
    transport = http.MockTransport(
        lambda request: http.Response(200, text=body, headers={"content-type": "text/event-stream"})
    )
    return http.Client(transport=transport)
