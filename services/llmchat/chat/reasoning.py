"""Splits a reasoning model's output into reasoning (inside <think>...</think>) and answer text, as it streams.

Character-driven like the tool parsers: only a tail that may be the start of a tag is held back, so the
events concatenate to the same result however the text is chunked.
"""

from llmchat.chat.call_object import partial_suffix
from llmchat.chat.events import ReasoningDelta, TextDelta

OPEN_TAG, CLOSE_TAG = "<think>", "</think>"


def template_reasons(template: str | None) -> bool:
    """Whether a chat template is a reasoning model's (Qwen3, DeepSeek-R1 and its distills mention the tag)."""
    return bool(template) and OPEN_TAG in template


def starts_in_reasoning(prompt: str) -> bool:
    """Templates that always think (DeepSeek-R1, Qwen3 thinking) end the generation prompt with the open tag."""
    return prompt.rstrip().endswith(OPEN_TAG)


class ReasoningSplitter:
    """feed(text) -> TextDelta and ReasoningDelta events; finish() flushes what was held back."""

    def __init__(self, in_reasoning: bool = False) -> None:
        self.in_reasoning = in_reasoning
        self.held = ""  # a tail that may be the start of the next tag
        # Whitespace right after a tag (the "\n" of "<think>\n", the "\n\n" after "</think>") only
        # separates the parts; like vLLM and DeepSeek's API, each part starts at its first visible character.
        self.after_tag = in_reasoning

    def feed(self, text: str) -> list[ReasoningDelta | TextDelta]:
        events: list[ReasoningDelta | TextDelta] = []
        text, self.held = self.held + text, ""
        while text:
            tag = CLOSE_TAG if self.in_reasoning else OPEN_TAG
            at = text.find(tag)
            if at < 0:
                keep = partial_suffix(text, tag)
                self._emit(events, text[: len(text) - keep])
                self.held = text[len(text) - keep :]
                break
            self._emit(events, text[:at])
            text = text[at + len(tag) :]
            self.in_reasoning, self.after_tag = not self.in_reasoning, True
        return events

    def finish(self) -> list[ReasoningDelta | TextDelta]:
        """Generation stopped: a held partial tag is text of the part it was in ("</thi" stays reasoning)."""
        events: list[ReasoningDelta | TextDelta] = []
        self._emit(events, self.held)
        self.held = ""
        return events

    def _emit(self, events: list[ReasoningDelta | TextDelta], text: str) -> None:
        if self.after_tag:
            text = text.lstrip()
            self.after_tag = not text
        if text:
            events.append(ReasoningDelta(text) if self.in_reasoning else TextDelta(text))
