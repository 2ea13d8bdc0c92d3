"""Call syntaxes that are not a JSON object, rewritten as one as they stream, so one parser (toolcalls.py) reads
every family: newer Mistral tokenizers' name[ARGS]{...} and Qwen3-Coder's XML calls."""

import json
import re
from collections.abc import Mapping
from typing import Any

from llmchat.chat.call_object import CallObject, partial_suffix


def through_marker(text: str, marker: str, final: bool) -> tuple[str, str, bool]:
    """`text` split after the first `marker`: (the text through it, the rest, True); where it is not there, (what
    can pass on, the tail that may be the marker's start, held unless `final`, False)."""
    at = text.find(marker)
    if at < 0:
        keep = 0 if final else partial_suffix(text, marker)
        return text[: len(text) - keep], text[len(text) - keep :], False
    return text[: at + len(marker)], text[at + len(marker) :], True


def call_head(name: str) -> str:
    """A rewritten call up to its arguments' object."""
    return f'{{"name": {json.dumps(name)}, "arguments": '


def cut_name(name: str) -> str:
    """A rewritten call whose name the end of the output cut off: the parser reports it unterminated."""
    return f'{{"name": {json.dumps(name)[:-1]}'


NAME_CHARS = re.compile(r"[\w.\-]*")


class ArgsMarkerCalls:
    """Streamed text in which each `open` marker is followed by NAME `marker` {arguments}, rewritten so that each
    call reads {"name": NAME, "arguments": {arguments}}; everything else passes unchanged. Text after the open
    marker that is not a name, the marker and an object is passed on as it was (the parser then rejects it as a
    call); a name cut off by the end of the output is passed on as the start of a call object, which the parser
    then reports as unterminated."""

    def __init__(self, open: str, marker: str) -> None:
        self.open, self.marker = open, marker
        self.state, self.buf, self.name = "text", "", ""
        self.scan = CallObject()

    def feed(self, text: str, final: bool = False) -> str:
        self.buf += text
        out: list[str] = []
        while self.buf:
            if self.state == "text":
                passed, self.buf, found = through_marker(self.buf, self.open, final)
                out.append(passed)
                if not found:
                    break
                self.state = "name"
            elif self.state == "name":
                at = self.buf.find(self.marker)
                name = self.buf[:at] if at >= 0 else self.buf[: len(self.buf) - partial_suffix(self.buf, self.marker)]
                if NAME_CHARS.fullmatch(name) is None:
                    out.append(self.buf)  # not a call in this syntax: left for the parser to reject
                    self.buf, self.state = "", "text"
                elif at < 0:
                    if final:
                        out.append(cut_name(name))
                        self.buf = ""
                    break
                else:
                    self.name, self.buf, self.state = name, self.buf[at + len(self.marker) :], "object"
            elif self.state == "object":  # the arguments must open an object
                body = self.buf.lstrip()
                if not body and not final:
                    break
                if body.startswith("{"):
                    head = call_head(self.name)
                    out.append(head)
                    self.state, self.scan = "args", CallObject()
                    for ch in head:
                        self.scan.feed(ch)
                else:
                    out.append(self.name + self.marker + self.buf)
                    self.buf, self.state = "", "text"
            else:
                out.append(self._arguments())
        return "".join(out)

    def _arguments(self) -> str:
        """The arguments' JSON, passed on up to the object's end (found by a CallObject scanning the rewritten
        call), which also closes the call."""
        for n, ch in enumerate(self.buf):
            self.scan.feed(ch)
            if self.scan.args_end is not None or self.scan.error is not None:
                done, self.buf, self.state = self.buf[: n + 1], self.buf[n + 1 :], "text"
                return done + ("}" if self.scan.error is None else "")
        done, self.buf = self.buf, ""
        return done


FUNCTION = "<function="
PARAMETER = "<parameter="
END_PARAMETER = "</parameter>"
END_FUNCTION = "</function>"


class XmlCalls:
    """Qwen3-Coder's calls, after each `open` marker:

        <function=NAME>
        <parameter=KEY>
        VALUE
        </parameter>
        </function>

    rewritten as {"name": NAME, "arguments": {KEY: VALUE, ...}}, each value converted to JSON by its parameter's
    schema (`schemas`: each tool's parameters; `xml_value`). A parameter is passed on once its end is read.
    Everything outside the calls passes unchanged; a call that does not follow the form is passed on as it was,
    for the parser to reject."""

    def __init__(self, open: str, schemas: Mapping[str, Any] | None = None) -> None:
        self.open, self.schemas = open, schemas or {}
        self.state, self.buf, self.name, self.count = "text", "", "", 0

    def feed(self, text: str, final: bool = False) -> str:
        self.buf += text
        out: list[str] = []
        while self.buf and self._step(out, final):
            pass
        if final and self.state != "text":  # cut off: a call begun, for the parser to report unterminated
            name = re.fullmatch(r"\s*<function=([^<>\n]*)", self.buf) if self.state == "function" else None
            begun = self.buf if self.state == "function" else ""  # nothing but space, or cut inside a parameter
            out.append(cut_name(name.group(1)) if name else begun)
            self.buf, self.state = "", "text"
        return "".join(out)

    def _step(self, out: list[str], final: bool) -> bool:
        """One step over the buffer; False where it needs more text."""
        if self.state == "text":
            passed, self.buf, found = through_marker(self.buf, self.open, final)
            out.append(passed)
            if found:
                self.state = "function"
            return found
        body = self.buf.lstrip()
        space = self.buf[: len(self.buf) - len(body)]
        if self.state == "function":
            found = re.match(r"<function=([^<>\n]*)>", body)
            if found is None:
                if _may_become(body, FUNCTION, r"<function=[^<>\n]*"):
                    return False  # more text to come, or (at the end) a call cut off
                self.state = "text"  # not a call in this form: passed on as it is
                out.append(self.buf)
                self.buf = ""
                return False
            self.name, self.count = found.group(1), 0
            out.append(f"{space}{call_head(self.name)}{{")
            self.buf, self.state = body[found.end() :], "parameters"
            return True
        # parameters: the next parameter, or the function's end
        if body.startswith(END_FUNCTION):
            out.append("}}")
            self.buf, self.state = body[len(END_FUNCTION) :], "text"
            return True
        found = re.match(r"<parameter=([^<>\n]*)>", body)
        end = body.find(END_PARAMETER, found.end()) if found else -1
        if found is None or end < 0:
            if found or _may_become(body, END_FUNCTION, "") or _may_become(body, PARAMETER, r"<parameter=[^<>\n]*"):
                return False  # more text to come, or (at the end) a call cut off
            out.append(space + body)  # not a parameter: left for the parser to reject
            self.buf, self.state = "", "text"
            return False
        key, value = found.group(1), body[found.end() : end]
        schema = (self.schemas.get(self.name) or {}).get("properties", {}).get(key, {})
        out.append(f"{', ' if self.count else ''}{json.dumps(key)}: {xml_value(_trim(value), schema)}")
        self.count += 1
        self.buf = body[end + len(END_PARAMETER) :]
        return True


def _may_become(body: str, marker: str, pattern: str) -> bool:
    """Whether `body` is still a prefix of `marker`, or of what `pattern` (after the marker) may grow into."""
    return marker.startswith(body) or bool(pattern and re.fullmatch(pattern, body))


def _trim(value: str) -> str:
    """A value without the newline the form puts on each side of it."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def xml_value(text: str, schema: Any) -> str:
    """A parameter's text as JSON by its schema's type: strings as they are, numbers, booleans and null parsed,
    objects and arrays as JSON; text that does not parse as its type stays a string. Without a type (or with
    several), JSON where the text is JSON, else a string."""
    kinds = schema.get("type") if isinstance(schema, dict) else None
    kinds = [kinds] if isinstance(kinds, str) else kinds or []
    if "string" in kinds and len(kinds) == 1:
        return json.dumps(text, ensure_ascii=False)
    stripped = text.strip()
    if "boolean" in kinds and stripped.lower() in ("true", "false"):
        return stripped.lower()
    if "integer" in kinds and re.fullmatch(r"-?\d+", stripped):
        return str(int(stripped))
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return json.dumps(text, ensure_ascii=False)
    allowed = {"integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}
    if kinds and not any(isinstance(value, allowed.get(k, ())) or (k == "null" and value is None) for k in kinds):
        return json.dumps(text, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)
