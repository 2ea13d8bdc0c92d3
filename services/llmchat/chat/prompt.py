"""Renders a conversation, tools included, to prompt tokens through the model's own chat template.

Templates that know tools get them as `tools=`. For templates that do not (SmolLM2's), tools are
described in the system message by a Hermes-style prompt (tool_prompt.jinja, replaceable), past calls
are written back as <tool_call> text and tool results go in a user turn as <tool_response> text.
Template variables (enable_thinking, reasoning_effort, ...) pass through; raw prompts skip the template.
"""

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from llmchat.chat.toolcalls import ToolSpec

BUILTIN_TOOL_PROMPT = files("llmchat.chat").joinpath("tool_prompt.jinja").read_text()
# Names apply_chat_template takes as arguments or gives the template itself: a template variable of
# the same name would fail the call or change how the prompt is built.
RESERVED_TEMPLATE_KEYS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


@dataclass(slots=True, frozen=True)
class CallRecord:
    """A call the assistant made earlier in the conversation."""

    id: str
    name: str
    arguments: str  # JSON text, as the client sent it back


@dataclass(slots=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[CallRecord, ...] = ()
    tool_call_id: str | None = None


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tool_dict(tool: ToolSpec) -> dict:
    function = {"name": tool.name, "description": tool.description or "", "parameters": tool.parameters or {}}
    return {"type": "function", "function": function}


class PromptRenderer:
    def __init__(self, tokenizer, tool_prompt: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.knows_tools = template_knows_tools(tokenizer.chat_template)
        source = tool_prompt.read_text() if tool_prompt else BUILTIN_TOOL_PROMPT
        self.tool_prompt = jinja2.Environment(autoescape=False).from_string(source)

    def render(
        self, messages: list[ChatMessage], tools: tuple[ToolSpec, ...], variables: dict[str, Any] | None = None
    ) -> list[int]:
        return self.tokenize(self.render_text(messages, tools, variables))

    def render_text(
        self, messages: list[ChatMessage], tools: tuple[ToolSpec, ...], variables: dict[str, Any] | None = None
    ) -> str:
        """The prompt text; `variables` reach the template as is (none of RESERVED_TEMPLATE_KEYS)."""
        extra = dict(variables or {})
        if self.knows_tools:
            conversation = [self._native(m, messages) for m in messages]
            if tools:
                extra["tools"] = [tool_dict(t) for t in tools]
        else:
            conversation = self._builtin(messages, tools)
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False, **extra)

    def tokenize(self, prompt_text: str) -> list[int]:
        # As apply_chat_template(tokenize=True) does: the template already wrote any BOS.
        return list(self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    def encode(self, raw_prompt: str) -> list[int]:
        """A raw prompt with the tokenizer's own special tokens: a BOS where the model expects one (Llama)."""
        return list(self.tokenizer(raw_prompt)["input_ids"])

    @staticmethod
    def _native(message: ChatMessage, messages: list[ChatMessage]) -> dict:
        turn: dict = {"role": message.role, "content": message.content}
        if message.tool_calls:
            # HF templates expect arguments as a mapping, not the JSON text OpenAI clients send back.
            turn["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                for c in message.tool_calls
            ]
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
            names = {c.id: c.name for m in messages for c in m.tool_calls}
            if message.tool_call_id in names:
                turn["name"] = names[message.tool_call_id]
        return turn

    def _builtin(self, messages: list[ChatMessage], tools: tuple[ToolSpec, ...]) -> list[dict]:
        conversation: list[dict] = []
        for m in messages:
            if m.role == "tool":
                response = f"<tool_response>\n{m.content}\n</tool_response>"
                if conversation and conversation[-1].get("is_tool_result"):
                    conversation[-1]["content"] += "\n" + response
                else:
                    conversation.append({"role": "user", "content": response, "is_tool_result": True})
                continue
            content = m.content
            for call in m.tool_calls:
                body = json.dumps({"name": call.name, "arguments": json.loads(call.arguments)})
                content += ("\n" if content else "") + f"<tool_call>\n{body}\n</tool_call>"
            conversation.append({"role": m.role, "content": content})
        if tools:
            prompt = self.tool_prompt.render(tools=[tool_dict(t) for t in tools]).strip()
            if conversation and conversation[0]["role"] == "system":
                conversation[0]["content"] = f"{conversation[0]['content']}\n\n{prompt}"
            else:
                conversation.insert(0, {"role": "system", "content": prompt})
        return [{"role": turn["role"], "content": turn["content"]} for turn in conversation]
