"""The service registry (registry.toml): each service's name, module, port and unit resources.

It needs only the standard library, so the justfile can run it without the venv:
    python3 hrserve/registry.py port llmchat      # 2020
    python3 hrserve/registry.py port llmchat@1    # 2021: replica 1 (systemd unit llmchat@1)
HRSERVE_REGISTRY points at another file (tests use it to add a fixture service).
"""

import os
import re
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("registry.toml")


class UnknownService(KeyError):
    pass


class BadInstance(ValueError):
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

    def port_for(self, instance: int | None) -> int:
        """Replica N listens on the registry port + N; None is the one plain service."""
        if instance is None:
            return self.port
        if instance < 0 or self.port + instance > 65535:
            raise BadInstance(f"{self.name}@{instance}: port {self.port} + {instance} is not a TCP port")
        return self.port + instance


def split_instance(unit_name: str) -> tuple[str, int | None]:
    """'llmchat@1' -> ('llmchat', 1), 'llmchat' -> ('llmchat', None), like systemd's template instances."""
    name, at, instance = unit_name.partition("@")
    if not at:
        return name, None
    # Canonical numbers only, so each port and GPU has one unit name (no llmchat@01 beside llmchat@1).
    if not re.fullmatch(r"0|[1-9][0-9]{0,4}", instance):
        raise BadInstance(f"'{unit_name}': the instance after '@' must be a number such as {name}@0 or {name}@1")
    return name, int(instance)


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
    """`port <service>` / `module <service>` print that field; `names` lists the services;
    `serve-args <service>` prints the python arguments that serve it in the foreground.

    <service> may name a replica, `llmchat@1`: its port is the registry port + 1.
    """
    if argv[:1] == ["names"]:
        sys.stdout.write("\n".join(load()) + "\n")
        return 0
    if len(argv) == 2 and argv[0] in ("port", "module", "serve-args"):
        try:
            name, instance = split_instance(argv[1])
            service = get(name)
            if argv[0] == "port":
                out = str(service.port_for(instance))
            elif argv[0] == "module":
                out = service.module
            else:
                out = f"-m {service.module} serve" + ("" if instance is None else f" --instance {instance}")
            sys.stdout.write(out + "\n")
        except (UnknownService, BadInstance) as exc:
            sys.stderr.write(f"{exc.args[0]}\n")
            return 1
        return 0
    sys.stderr.write("usage: registry.py port|module|serve-args <service>[@<instance>] | names\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
