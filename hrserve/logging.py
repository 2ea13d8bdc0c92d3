"""Log setup: plain lines for a terminal or JSON lines for journald, each carrying trace and request ids.

Under systemd, stderr is a stream into the journal, which files every line at priority info unless the
line starts with an sd-daemon prefix such as `<4>`; when stderr is that stream, each line carries its
record's priority, so `journalctl -p warning` shows warnings and worse.
"""

import json
import logging
import os
import sys
import time
from typing import TextIO

from opentelemetry import trace

from hrserve.request import request_id_var
from hrserve.spans import format_span_id, format_trace_id


class ContextFilter(logging.Filter):
    """Stamps each record with the current trace id, span id and request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format_trace_id(ctx.trace_id) if ctx.is_valid else None
        record.span_id = format_span_id(ctx.span_id) if ctx.is_valid else None
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("trace_id", "span_id", "request_id"):
            if getattr(record, key, None):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, timestamps: bool = True) -> None:
        super().__init__(("%(asctime)s " if timestamps else "") + "%(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [request_id={request_id}]" if request_id else text


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level; a custom level takes that of the standard one below it."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def writes_to_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal stream systemd connected (JOURNAL_STREAM=<dev>:<inode>).

    The variable alone is not enough: a child process inherits it even when its output goes to a pipe or a
    file, where `<4>` would be literal text.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset or malformed, or a stream without a file descriptor
        return False
    return (stat.st_dev, stat.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with the record's priority.

    journald splits the stream at newlines and reads a prefix only at the start of each line, so a
    traceback prefixed once would show its header at error and its frames and exception at info; collapsing
    it onto one line would keep the priority but leave it unreadable in `journalctl`.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def setup_logging(level: str = "info", json_lines: bool = False, stream: TextIO | None = None) -> None:
    """Configures the root logger once (writing to `stream`, stderr by default); uvicorn's loggers and
    Python warnings propagate into it."""
    stream = sys.stderr if stream is None else stream
    journal = writes_to_journal(stream)
    # The journal stamps each entry itself.
    formatter = JsonFormatter() if json_lines else TextFormatter(timestamps=not journal)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter(formatter) if journal else formatter)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Our access middleware logs each request once, with its id.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # A library's warning then reaches the journal at warning priority, not as loose lines at info.
    logging.captureWarnings(True)
