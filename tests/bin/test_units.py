"""Generated systemd units: in sync with the registry, valid for systemd, and a second service is one entry;
replicas (the template unit <service>@.service, `--instance N`) listen on the registry port + N.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hrserve import registry
from llmchat.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
GEN = [sys.executable, str(ROOT / "bin/gen-systemd.py")]
ECHO_ENTRY = """
[services.echosvc]
description = "echosvc: test fixture"
module = "tests.fixtures.echosvc"
port = {port}
memory_high = "200M"
memory_max = "300M"
"""


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120, **kwargs)


def two_free_ports() -> int:
    """A free port whose successor is free too, for instance 1 of a service on it."""
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def wait_for_health(port: int, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").json()
        except httpx.TransportError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)


@pytest.fixture
def two_services(tmp_path) -> tuple[Path, int]:
    port = two_free_ports()
    path = tmp_path / "registry.toml"
    path.write_text(registry.DEFAULT_PATH.read_text() + ECHO_ENTRY.format(port=port))
    return path, port


def test_committed_units_match_the_registry():
    result = run([*GEN, "--check"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (ROOT / "systemd").glob("*.service")) == ["llmchat.service", "llmchat@.service"]


def test_check_catches_a_hand_edit(tmp_path):
    units = tmp_path / "units"
    shutil.copytree(ROOT / "systemd", units)
    assert run([*GEN, "--check", "--out", str(units)]).returncode == 0
    unit = units / "llmchat.service"
    unit.write_text(unit.read_text().replace("MemoryMax=16G", "MemoryMax=64G"))
    result = run([*GEN, "--check", "--out", str(units)])
    assert result.returncode == 1
    assert "-MemoryMax=64G" in result.stderr and "+MemoryMax=16G" in result.stderr
    assert "just units" in result.stderr


def test_check_catches_drift_in_the_template(tmp_path):
    units = tmp_path / "units"
    shutil.copytree(ROOT / "systemd", units)
    template = units / "llmchat@.service"
    template.write_text(template.read_text().replace("CUDA_VISIBLE_DEVICES=%i", "CUDA_VISIBLE_DEVICES=0"))
    result = run([*GEN, "--check", "--out", str(units)])
    assert result.returncode == 1
    assert "-Environment=CUDA_VISIBLE_DEVICES=0" in result.stderr
    assert "+Environment=CUDA_VISIBLE_DEVICES=%i" in result.stderr
    template.unlink()
    result = run([*GEN, "--check", "--out", str(units)])
    assert result.returncode == 1 and "+Conflicts=llmchat.service" in result.stderr


def test_stale_units_are_removed_templates_included(tmp_path, two_services):
    registry_file, _ = two_services
    units = tmp_path / "units"
    run([*GEN, "--registry", str(registry_file), "--out", str(units)])
    assert {"echosvc.service", "echosvc@.service"} <= {p.name for p in units.iterdir()}
    assert run([*GEN, "--check", "--out", str(units)]).returncode == 1, "echosvc is not in the default registry"
    run([*GEN, "--out", str(units)])
    assert sorted(p.name for p in units.iterdir()) == ["llmchat.service", "llmchat@.service"]


TEST_TOOLS = {"pytest", "ruff", "schemathesis", "hypothesis", "litellm", "import-linter", "uv", "matplotlib"}


def locked(lock: Path) -> set[str]:
    return {line.split("==")[0].lower() for line in lock.read_text().splitlines() if "==" in line and line[0].isalpha()}


def test_units_run_the_runtime_venv_which_holds_no_test_tools():
    text = (ROOT / "systemd/llmchat.service").read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    python = exec_start.split("=", 1)[1].split()[0]
    assert python == "%h/.local/share/hrserve/current/.venv/bin/python"
    runtime, dev = locked(ROOT / "bin/locks/runtime.txt"), locked(ROOT / "bin/locks/dev.txt")
    assert {"fastapi", "transformers", "openai", "opentelemetry-sdk"} <= runtime
    assert not runtime & TEST_TOOLS and TEST_TOOLS <= dev
    venv_python = ROOT / ".venv/bin/python"
    if not venv_python.exists():
        pytest.skip("no .venv in this checkout (bin/sync makes it)")
    assert Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), "the suite runs from .venv-dev"
    for tool in ("pytest", "ruff", "schemathesis", "litellm"):
        probe = run([str(venv_python), "-c", f"import {tool}"])
        assert probe.returncode != 0, f"{tool} is importable in the runtime venv the units run"


def test_unit_contents():
    text = (ROOT / "systemd/llmchat.service").read_text()
    assert text.startswith("# Generated by bin/gen-systemd.py")
    for line in (
        "Type=notify",
        "ExecStart=%h/.local/share/hrserve/current/.venv/bin/python -m llmchat serve",
        "WorkingDirectory=%h/.local/share/hrserve/current",
        "Environment=OTEL_EXPORTER_OTLP_ENDPOINT=localhost:4317",
        "Environment=OTEL_SERVICE_NAME=llmchat",
        "Environment=TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1",
        "EnvironmentFile=-%h/.config/hrserve/llmchat.env",
        "Restart=on-failure",
        "MemoryHigh=12G",
        "MemoryMax=16G",
        "TimeoutStartSec=900",
        "TimeoutStopSec=45",
        "WatchdogSec=120",
    ):
        assert line in text.splitlines(), line
    assert "--instance" not in text and "CUDA_VISIBLE_DEVICES" not in text and "Conflicts" not in text


def test_template_unit_contents():
    lines = (ROOT / "systemd/llmchat@.service").read_text().splitlines()
    for line in (
        "Conflicts=llmchat.service",
        "ExecStart=%h/.local/share/hrserve/current/.venv/bin/python -m llmchat serve --instance %i",
        "Environment=OTEL_SERVICE_NAME=llmchat",
        "Environment=OTEL_RESOURCE_ATTRIBUTES=service.instance.id=llmchat@%i",
        "Environment=CUDA_VISIBLE_DEVICES=%i",
        "Environment=HIP_VISIBLE_DEVICES=%i",
        "Type=notify",
        "MemoryMax=16G",
        "WatchdogSec=120",
    ):
        assert line in lines, line
    # The replica's own file is read last, so it overrides the shared one (systemd: later files win).
    env_files = [line for line in lines if line.startswith("EnvironmentFile=")]
    assert env_files == [
        "EnvironmentFile=-%h/.config/hrserve/llmchat.env",
        "EnvironmentFile=-%h/.config/hrserve/llmchat@%i.env",
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path, two_services):
    registry_file, _ = two_services
    units = tmp_path / "units"
    assert run([*GEN, "--registry", str(registry_file), "--out", str(units)]).returncode == 0
    assert sorted(p.name for p in units.iterdir()) == [
        "echosvc.service",
        "echosvc@.service",
        "llmchat.service",
        "llmchat@.service",
    ]
    # What --install sets up: %h/.local/share/hrserve/current is this checkout, so ExecStart resolves
    # to the real interpreter in its venv.
    home = tmp_path / "home"
    (home / ".local/share/hrserve").mkdir(parents=True)
    (home / ".local/share/hrserve/current").symlink_to(ROOT)
    (tmp_path / "run").mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    # A template is verified as an instance: the link is what `systemctl --user enable llmchat@1` makes.
    for name in ("llmchat", "echosvc"):
        (units / f"{name}@1.service").symlink_to(f"{name}@.service")
    for unit in sorted(units.iterdir()):
        result = run(["systemd-analyze", "--user", "verify", str(unit)], env=env)
        assert result.returncode == 0 and result.stderr == "", (unit.name, result.stderr)


def test_a_second_service_is_one_registry_entry(tmp_path, two_services):
    registry_file, port = two_services
    env = {**os.environ, "HRSERVE_REGISTRY": str(registry_file)}
    assert run(["python3", "hrserve/registry.py", "port", "echosvc"], env=env).stdout == f"{port}\n"
    units = tmp_path / "units"
    run([*GEN, "--out", str(units)], env=env)
    assert (
        "ExecStart=%h/.local/share/hrserve/current/.venv/bin/python -m tests.fixtures.echosvc serve"
        in (units / "echosvc.service").read_text()
    )
    # It serves on the registry's port with no port given anywhere else.
    proc = subprocess.Popen([sys.executable, "-m", "tests.fixtures.echosvc", "serve"], cwd=ROOT, env=env)
    try:
        assert wait_for_health(port, proc) == {"status": "ok", "service": "echosvc", "port": port}
        assert httpx.get(f"http://127.0.0.1:{port}/echo/hi").json() == {"echo": "hi"}
    finally:
        proc.terminate()
    assert proc.wait(30) == 0, "SIGTERM is a clean stop"


def test_just_lists_and_dry_runs_every_recipe():
    just = [str(ROOT / "bin/just")]
    listed = run([*just, "--list"])
    assert listed.returncode == 0
    recipes = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert {"sync", "serve", "test", "bench", "units", "install-units", "start", "stop", "restart", "status"} <= set(
        recipes
    )
    assert {"logs", "health"} <= set(recipes)
    for line in listed.stdout.splitlines()[1:]:
        assert "#" in line, f"recipe without a doc comment: {line}"
    takes_service = {"start", "stop", "restart", "status", "logs", "health", "sync", "serve"}
    for recipe in recipes:
        for service in ("llmchat", "llmchat@1") if recipe in takes_service else (None,):
            args = [recipe, service] if service else [recipe]
            result = run([*just, "--dry-run", *args])
            assert result.returncode == 0, (args, result.stderr)
    port = run([*just, "_port", "llmchat"])
    assert port.stdout.strip() == "2020"
    assert run([*just, "_port", "llmchat@1"]).stdout.strip() == "2021"
    assert run([*just, "_port", "nope"]).returncode != 0


def test_registry_understands_unit_instance_names():
    assert registry.split_instance("llmchat") == ("llmchat", None)
    assert registry.split_instance("llmchat@0") == ("llmchat", 0)
    assert registry.split_instance("llmchat@12") == ("llmchat", 12)
    service = registry.load()["llmchat"]
    assert (service.port_for(None), service.port_for(0), service.port_for(1)) == (2020, 2020, 2021)
    for bad in ("llmchat@", "llmchat@x", "llmchat@-1", "llmchat@01", "llmchat@1@2"):
        with pytest.raises(registry.BadInstance):
            registry.split_instance(bad)
    with pytest.raises(registry.BadInstance):
        service.port_for(65535)


def test_registry_cli_for_a_replica():
    registry_py = ["python3", "hrserve/registry.py"]
    assert run([*registry_py, "port", "llmchat@1"]).stdout == "2021\n"
    assert run([*registry_py, "module", "llmchat@1"]).stdout == "llmchat\n"
    assert run([*registry_py, "serve-args", "llmchat@1"]).stdout == "-m llmchat serve --instance 1\n"
    assert run([*registry_py, "serve-args", "llmchat"]).stdout == "-m llmchat serve\n"
    for bad in ("llmchat@x", "llmchat@", "nope@1"):
        result = run([*registry_py, "port", bad])
        assert result.returncode == 1 and result.stdout == "" and bad.split("@")[0] in result.stderr, bad
    assert "must be a number" in run([*registry_py, "port", "llmchat@x"]).stderr


def test_instance_moves_only_the_default_port(monkeypatch):
    monkeypatch.delenv("LLMCHAT_PORT", raising=False)
    monkeypatch.delenv("LLMCHAT_INSTANCE", raising=False)
    assert (Settings().port, Settings(instance=0).port, Settings(instance=1).port) == (2020, 2020, 2021)
    assert Settings(instance=1, port=9000).port == 9000, "an explicit --port wins"
    assert Settings(instance=1, port=0).port == 0
    monkeypatch.setenv("LLMCHAT_PORT", "9100")
    assert Settings(instance=1).port == 9100, "so does the environment (an EnvironmentFile)"
    monkeypatch.delenv("LLMCHAT_PORT")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings(instance=-1)
    with pytest.raises(ValueError, match="above 65535"):
        Settings(instance=65535)


def test_a_replica_listens_on_port_plus_instance(two_services):
    registry_file, port = two_services
    env = {**os.environ, "HRSERVE_REGISTRY": str(registry_file)}
    cmd = [sys.executable, "-m", "tests.fixtures.echosvc", "serve", "--instance", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        assert wait_for_health(port + 1, proc)["port"] == port + 1
        # `just health echosvc@1` finds it on the replica's port.
        health = run([str(ROOT / "bin/just"), "health", "echosvc@1"], env=env)
        assert health.returncode == 0 and f'"port":{port + 1}' in health.stdout, health.stderr
    finally:
        proc.terminate()
    assert proc.wait(30) == 0
