"""An OpenAI Responses request (input items, instructions, tools, text.format) as the protocol-neutral
ChatRequest, and the request settings a Response object repeats back."""

import json
from typing import Any

from llmchat.api.common import ROLES, ToolSet, json_output, tool_choice
from llmchat.api.responses_types import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    NamedFunctionChoice,
    OtherPart,
    OtherTool,
    ReasoningItem,
    ResponsesRequest,
)
from llmchat.chat import CallRecord, ChatError, ChatMessage, ChatRequest, ToolSpec

STATELESS = "This server is stateless and stores no responses"
_MEDIA = {"input_image": "images", "input_file": "files", "input_audio": "audio"}
# The chat core's field names, as this protocol names them.
NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "output_format": "text.format"}
_TOOL_FIELDS = {"type", "name", "description", "parameters", "strict"}
_FORMAT_FIELDS = {"type", "name", "description", "schema_", "strict"}


def to_chat_request(body: ResponsesRequest) -> ChatRequest:
    """The protocol-neutral request; raises ChatError (a 400) for anything that cannot be honoured."""
    for name in ("previous_response_id", "conversation"):
        if getattr(body, name) is not None:
            raise ChatError(
                f"{name} cannot be used: {STATELESS}. Send the whole conversation as input items instead "
                "(earlier output items, then function_call_output items and new messages).",
                name,
            )
    if body.background:
        raise ChatError(
            f"background responses need stored responses. {STATELESS}; leave background unset.", "background"
        )
    tools = _tools(body)
    choice, tool_name = _tool_choice(body, tools)
    request = ChatRequest(
        messages=_messages(body),
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=body.parallel_tool_calls,
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
    )
    _text_format(body, request)
    return request


def _messages(body: ResponsesRequest) -> list[ChatMessage]:
    messages = [ChatMessage("system", body.instructions)] if body.instructions else []
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    call_ids: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            messages.append(ChatMessage(ROLES.get(item.role, item.role), _text(item.content, f"input.{i}.content")))
        elif isinstance(item, FunctionCallItem):
            _check_arguments(item.arguments, f"input.{i}.arguments")
            call = CallRecord(item.call_id, item.name, item.arguments)
            call_ids.add(item.call_id)
            # One assistant turn is a message item and/or several function_call items: chat templates
            # want them as one assistant message carrying the calls.
            if messages and messages[-1].role == "assistant":
                messages[-1].tool_calls += (call,)
            else:
                messages.append(ChatMessage("assistant", "", (call,)))
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in call_ids:
                raise ChatError(
                    f"No function_call item before this output has call_id '{item.call_id}'. {STATELESS}: "
                    "send the function_call item itself before its output.",
                    f"input.{i}.call_id",
                )
            messages.append(ChatMessage("tool", _text(item.output, f"input.{i}.output"), tool_call_id=item.call_id))
        elif isinstance(item, ReasoningItem):
            # Earlier turns' reasoning is not shown to the model again (chat templates drop it too).
            continue
        else:
            raise ChatError(
                f"Input items of type '{item.type}' are not supported; send message, function_call and "
                "function_call_output items.",
                f"input.{i}.type",
            )
    return messages


def _text(content: str | list, param: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if isinstance(part, OtherPart):
            what = f"{_MEDIA[part.type]} ({part.type})" if part.type in _MEDIA else f"'{part.type}' parts"
            raise ChatError(
                f"This server's model reads text only: {what} are not supported. Send input_text parts.",
                f"{param}.{j}.type",
            )
    return "".join(part.text for part in content)


def _check_arguments(arguments: str, param: str) -> None:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ChatError("A function call's arguments must be a JSON object encoded as a string.", param)


def _tools(body: ResponsesRequest) -> tuple[ToolSpec, ...]:
    tools = ToolSet()
    for i, tool in enumerate(body.tools or ()):
        if isinstance(tool, OtherTool):
            raise ChatError(
                f"Tools of type '{tool.type}' are not supported: this server hosts no built-in tools. "
                "Offer function tools ({'type': 'function', 'name': ..., 'parameters': ...}).",
                f"tools.{i}.type",
            )
        tools.add(tool.name, tool.description, tool.parameters, f"tools.{i}", "parameters")
    return tools.done()


def _tool_choice(body: ResponsesRequest, tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    choice = body.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        return tool_choice("function", choice.name, tools)
    return tool_choice(choice, None, tools)


def _text_format(body: ResponsesRequest, request: ChatRequest) -> None:
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text":
        schema = fmt.schema_ if fmt.type == "json_schema" else None
        json_output(request, schema, "text.format", "text.format.schema")


def echo_settings(body: ResponsesRequest) -> dict[str, Any]:
    """The request settings a Response object repeats back."""
    choice = body.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        choice = {"type": "function", "name": choice.name}
    # Only the fields the SDK's types know: an unknown field of the wrong type would fail their validation.
    fmt = body.text.format if body.text else None
    text = fmt.model_dump(include=_FORMAT_FIELDS, by_alias=True, exclude_none=True) if fmt else {"type": "text"}
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": None,
        "reasoning": {"effort": body.reasoning.effort, "summary": body.reasoning.summary} if body.reasoning else None,
        "temperature": body.temperature,
        "text": {"format": text},
        "tool_choice": choice or "auto",
        "tools": [t.model_dump(include=_TOOL_FIELDS, exclude_none=True) for t in body.tools or ()],
        "top_p": body.top_p,
        "user": body.user,
        # Not a field of the SDK's Response type (extra fields are kept): nothing is ever stored here.
        "store": False,
    }
