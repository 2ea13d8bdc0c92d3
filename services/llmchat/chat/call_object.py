"""One tool call's JSON, {"name": ..., "arguments": {...}}: scanned a character at a time as the model writes it,
and compared with other calls as JSON values."""

import json
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")


def call_key(name: str, arguments: str) -> tuple[str, str]:
    """What makes two calls the same: the name, and the arguments as JSON values (key order, spacing and
    1 versus 1.0 aside). Arguments that are not JSON compare as text."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return name, arguments
    return name, json.dumps(_integral(value), sort_keys=True, ensure_ascii=False)


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class CallObject:
    """Scans one JSON object spelling a call, {"name": ..., "arguments": {...}}, one character at a time.

    It knows the name once its string closes, which slice of the text is the arguments, and where the
    object ends; `error` is set at the first character that cannot belong to such an object.
    """

    def __init__(self) -> None:
        self.text = ""
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.expect = "open"  # then, at depth 1: key | colon | value | nested | scalar | comma
        self.key: str | None = None
        self.start = 0  # where the current key or value began
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.is_done = False
        self.error: str | None = None

    def feed(self, ch: str) -> None:
        i = len(self.text)
        self.text += ch
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 1:
                    self._string_closed(i)
            return
        if ch.isspace():
            if self.depth == 1 and self.expect == "scalar":
                self._value_ended(i)
            return
        if self.depth == 0:
            if ch != "{":
                self.error = "a call must be a JSON object"
                return
            self.depth, self.expect = 1, "key"
            return
        if self.depth == 1:
            self._at_top(ch, i)
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 1:
                self._value_ended(i + 1)
        elif ch == '"':
            self.in_string = True

    def _at_top(self, ch: str, i: int) -> None:
        if self.expect == "scalar" and ch in ",}":
            self._value_ended(i)
        if ch == '"' and self.expect in ("key", "value"):
            self.in_string, self.start = True, i
        elif ch == ":" and self.expect == "colon":
            self.expect = "value"
        elif ch in "{[" and self.expect == "value":
            self.start, self.depth = i, 2
            self.expect = "nested"
        elif ch == "," and self.expect == "comma":
            self.expect = "key"
        elif ch == "}" and self.expect in ("key", "comma"):
            self._close()
        elif self.expect == "value" and (ch.isalnum() or ch == "-"):
            self.start, self.expect = i, "scalar"
        elif self.expect != "scalar":
            self.error = "a call object is not well-formed JSON"

    def _string_closed(self, i: int) -> None:
        try:
            text = json.loads(self.text[self.start : i + 1])
        except json.JSONDecodeError:
            self.error = "a call object holds an invalid JSON string"
            return
        if self.expect == "key":
            self.key, self.expect = text, "colon"
            return
        if self.key == "name":
            self.name = text
        self._value_ended(i + 1)

    def _value_ended(self, end: int) -> None:
        if self.key in ARGUMENT_KEYS and self.args_start is None:
            self.args_start, self.args_end = self.start, end
        self.expect = "comma"

    def _close(self) -> None:
        self.depth, self.is_done = 0, True
        try:
            call = json.loads(self.text)
        except json.JSONDecodeError as exc:
            self.error = f"the call is not valid JSON: {exc}"
            return
        if not isinstance(call.get("name"), str):
            self.error = "the call has no string 'name'"
        elif not isinstance(call.get(next((k for k in ARGUMENT_KEYS if k in call), "arguments"), {}), dict):
            self.error = "the call's arguments are not a JSON object"

    def streaming_args(self) -> str:
        """The arguments text known so far: all of it once they ended, or a growing object's prefix."""
        if self.args_start is not None:
            return self.text[self.args_start : self.args_end]
        if self.key in ARGUMENT_KEYS and self.expect == "nested" and self.text[self.start] == "{":
            return self.text[self.start :]
        return ""

    def arguments(self) -> str:
        return self.text[self.args_start : self.args_end] if self.args_start is not None else "{}"
