"""JSON log lines carry the trace, span and request ids of the work that wrote them; under systemd each line
carries its sd-daemon priority (`<4>` for a warning), so the journal files it at that priority."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import uvicorn
from opentelemetry import trace

from hrserve.logging import ContextFilter, JsonFormatter, setup_logging
from hrserve.request import request_id_var


def test_json_line_has_ids():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    token = request_id_var.set("req-1")
    try:
        with trace.get_tracer("t").start_as_current_span("s") as span:
            ContextFilter().filter(record)
            ctx = span.get_span_context()
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "info"
    assert line["request_id"] == "req-1"
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")


@pytest.fixture
def restore_logging():
    """setup_logging changes process-wide state: put the root and uvicorn loggers back afterwards."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in names}
    saved_propagate = {name: logging.getLogger(name).propagate for name in names}
    yield
    logging.captureWarnings(False)
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = saved_propagate[name]


def journal_stream(path: Path) -> str:
    stat = os.stat(path)
    return f"{stat.st_dev}:{stat.st_ino}"


def log_some_lines(stream_path: Path, json_lines: bool = False) -> list[str]:
    """Configures logging onto the file at `stream_path`, writes a few records and returns the file's lines."""
    with stream_path.open("a", encoding="utf-8") as stream:
        setup_logging("info", json_lines, stream=stream)
        log = logging.getLogger("demo")
        log.info("starting")
        log.warning("running low")
        try:
            raise ValueError("bad input")
        except ValueError:
            log.exception("request failed")
        log.debug("not shown at info")
    return stream_path.read_text(encoding="utf-8").splitlines()


def test_journal_lines_carry_their_priority(tmp_path, monkeypatch, restore_logging):
    path = tmp_path / "journal"
    path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(path))
    lines = log_some_lines(path)
    assert lines[0].startswith("<6>") and lines[0].endswith("starting")
    assert lines[1].startswith("<4>WARNING") and lines[1].endswith("running low")
    # journald files each line separately: every line of the traceback must say error, down to the exception.
    traceback = lines[2:]
    assert traceback[0].startswith("<3>ERROR") and "request failed" in traceback[0]
    assert any("Traceback" in line for line in traceback) and traceback[-1] == "<3>ValueError: bad input"
    assert all(line.startswith("<3>") for line in traceback)
    assert not any("not shown" in line for line in lines)


def test_journal_json_lines_carry_their_priority(tmp_path, monkeypatch, restore_logging):
    path = tmp_path / "journal"
    path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(path))
    lines = log_some_lines(path, json_lines=True)
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert json.loads(lines[1][3:])["level"] == "warning"
    assert "ValueError: bad input" in json.loads(lines[2][3:])["exception"]


def test_no_prefix_outside_the_journal(tmp_path, monkeypatch, restore_logging):
    path = tmp_path / "log"
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    lines = log_some_lines(path)
    assert lines[1].endswith("WARNING demo: running low") and not lines[1].startswith("<")
    assert not any(line.startswith("<") for line in lines)


def test_no_prefix_when_the_journal_stream_is_another_file(tmp_path, monkeypatch, restore_logging):
    """A child of a service inherits JOURNAL_STREAM even when its output goes elsewhere."""
    other = tmp_path / "journal"
    other.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(other))
    lines = log_some_lines(tmp_path / "log")
    assert lines and not any(line.startswith("<") for line in lines)


def test_uvicorn_and_warnings_reach_the_journal_with_their_priority(tmp_path, monkeypatch, restore_logging):
    path = tmp_path / "journal"
    path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(path))
    with path.open("a", encoding="utf-8") as stream:
        setup_logging("info", stream=stream)
        # As `llmchat serve` does after setup_logging: uvicorn's Config sets its loggers' levels.
        uvicorn.Config(lambda scope, receive, send: None, log_config=None, log_level="info", access_log=False)
        logging.getLogger("uvicorn.error").warning("uvicorn says careful")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("old API", DeprecationWarning, stacklevel=1)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("<4>") and lines[0].endswith("uvicorn.error: uvicorn says careful")
    assert lines[1].startswith("<4>") and "DeprecationWarning: old API" in lines[1]
    assert all(line.startswith("<4>") for line in lines[1:])


def test_the_journal_is_detected_on_the_real_stderr(tmp_path):
    """The whole path in a fresh process: JOURNAL_STREAM names the file its stderr is, or another file."""
    script = "import logging; from hrserve import setup_logging; setup_logging(); logging.warning('disk full')"
    stderr, other = tmp_path / "stderr", tmp_path / "other"
    stderr.touch()
    other.touch()
    for journal, prefixed in ((stderr, True), (other, False)):
        env = os.environ | {"JOURNAL_STREAM": journal_stream(journal)}
        with stderr.open("w") as err:
            subprocess.run([sys.executable, "-c", script], stderr=err, env=env, check=True, timeout=60)
        text = stderr.read_text()
        assert text.endswith("WARNING root: disk full\n")
        assert text.startswith("<4>WARNING root: disk full") == prefixed
