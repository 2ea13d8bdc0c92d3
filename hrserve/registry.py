"""The service registry (registry.toml): each service's name, module, port and unit resources.

It needs only the standard library, so the justfile can run it without the venv:
    python3 hrserve/registry.py port llmchat
HRSERVE_REGISTRY points at another file (tests use it to add a fixture service).
"""

import os
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("registry.toml")


class UnknownService(KeyError):
    pass


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    description: str
    module: str
    port: int
    memory_high: str = "4G"
    memory_max: str = "6G"
    start_timeout_s: int = 120
    stop_timeout_s: int = 45
    watchdog_s: int = 0  # 0: no watchdog


def registry_path() -> Path:
    return Path(os.environ.get("HRSERVE_REGISTRY") or DEFAULT_PATH)


def load(path: Path | None = None) -> dict[str, Service]:
    data = tomllib.loads((path or registry_path()).read_text())
    known = {f.name for f in fields(Service)}
    services = {}
    for name, entry in data.get("services", {}).items():
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"registry entry '{name}' has unknown keys: {sorted(unknown)}")
        services[name] = Service(name=name, **entry)
    return services


def get(name: str, path: Path | None = None) -> Service:
    services = load(path)
    if name not in services:
        raise UnknownService(f"no service '{name}' in {path or registry_path()}; known: {sorted(services)}")
    return services[name]


def main(argv: list[str]) -> int:
    """`port <service>` / `module <service>` print that field; `names` lists the services."""
    if argv[:1] == ["names"]:
        sys.stdout.write("\n".join(load()) + "\n")
        return 0
    if len(argv) == 2 and argv[0] in ("port", "module"):
        try:
            sys.stdout.write(f"{getattr(get(argv[1]), argv[0])}\n")
        except UnknownService as exc:
            sys.stderr.write(f"{exc.args[0]}\n")
            return 1
        return 0
    sys.stderr.write("usage: registry.py port|module <service> | names\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
