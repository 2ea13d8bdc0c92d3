"""Choices timed at load (the CPU's dtype, each projection's 4-bit kernel and crossover), kept per machine.

Timings on a shared machine are noisy: two starts minutes apart picked different kernels, and with them
different greedy outputs. So the first start on a machine measures and writes what it chose to
`<cache_dir>/measured/`, keyed by the CPU (model and flags), its threads, torch, llmchat's kernel and the
model; later starts read the same choices back. `remeasure` (LLMCHAT_REMEASURE) times them again.
"""

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmchat.engine import cpu, dot8

log = logging.getLogger("llmchat.engine.choices")

# Bump when what is stored, or how it is timed, changes: older files are then measured again.
FORMAT = 1


def machine() -> dict[str, Any]:
    """What the timings depend on besides the model."""
    return {
        "cpu": cpu_model(),
        "flags": cpu.describe(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernel": hashlib.sha256(dot8.SOURCE.read_bytes()).hexdigest()[:16],
        "format": FORMAT,
    }


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found[1].strip() if found else ""


class Choices:
    """Values measured once and reused: within this process always, and by later starts where `path` is set.

    `get(name, measure)` returns the kept value of `name`, or calls `measure()` and keeps (and writes) its
    result. Values go through JSON either way, so a reused one is the same as a measured one.
    """

    def __init__(self, path: Path | None = None, identity: dict | None = None, remeasure: bool = False) -> None:
        self.path = path
        self.identity = identity or {}
        self.values: dict[str, Any] = {}
        self.measured_at: float | None = None
        self.num_measured = self.num_reused = 0
        if path is not None and not remeasure:
            self._read(path)

    def get(self, name: str, measure: Callable[[], Any]) -> Any:
        if name in self.values:
            self.num_reused += 1
            return self.values[name]
        value = json.loads(json.dumps(measure()))
        self.values[name] = value
        self.num_measured += 1
        self.measured_at = time.time()
        self._write()
        return value

    @property
    def state(self) -> str:
        """'measured now', 'reused', 'partly reused' (a new choice beside kept ones) or 'none' (nothing timed)."""
        if self.num_measured and self.num_reused:
            return "partly reused"
        return "measured now" if self.num_measured else "reused" if self.num_reused else "none"

    def describe(self) -> dict:
        """For /health: whether this start measured or reused, where they are kept, and the choices."""
        when = self.measured_at and time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.measured_at))
        return {
            "state": self.state,
            "file": str(self.path) if self.path else None,
            "measured_at": when,
            "values": self.values,
        }

    def _read(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("measuring again: the kept choices in %s could not be read: %s", path, exc)
            return
        if not isinstance(stored, dict) or stored.get("identity") != self.identity:
            log.info("measuring again: %s was written for another machine, torch or model", path)
            return
        self.values = dict(stored.get("values") or {})
        self.measured_at = stored.get("measured_at")

    def _write(self) -> None:
        if self.path is None:
            return
        body = {"identity": self.identity, "measured_at": self.measured_at, "values": self.values}
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # replicas each write their own
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(body, indent=1, sort_keys=True))
            os.replace(temporary, self.path)
        except OSError as exc:  # a read-only cache costs the timings at every start, nothing more
            log.warning("could not keep the measured choices in %s: %s", self.path, exc)


def kept_for(cache_dir: Path, model: str, remeasure: bool = False) -> Choices:
    """The kept choices for `model` (a name that tells models apart: path, file and size) on this machine."""
    identity = machine() | {"model": model}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name)[:64] or "model"
    choices = Choices(cache_dir / "measured" / f"{name}-{key}.json", identity, remeasure)
    if choices.values:
        log.info("reusing the choices measured at an earlier start: %s", choices.path)
    return choices
