#!/usr/bin/env python3
"""Writes a LiteLLM Router/Proxy config that spreads one model over llmchat replicas on several hosts.

    bin/gen-litellm.py gpu1 gpu2@0-3 10.0.0.7:8000 > litellm.yaml
    litellm --config litellm.yaml            # the proxy; or Router(**config) in your own process

A replica is HOST (the service's registry port), HOST@N or HOST@N-M (instances N..M of the
llmchat@.service template, each on registry port + N), or HOST:PORT. Every replica becomes one
deployment of the same model group, so the Router balances over them (least-busy by default),
retries a failed call on another replica, cools a failing replica down and, with the proxy's
background health checks, stops routing to a replica that stopped answering. --fallback replicas
form a second group that is tried only when the whole first group fails.

Standard library only (JSON is YAML, and LiteLLM reads either), so it runs before any venv exists.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hrserve"))
import registry  # noqa: E402  (hrserve/registry.py, standard library only)

STRATEGIES = ("least-busy", "latency-based-routing", "simple-shuffle", "usage-based-routing-v2")


def replicas(spec: str, service: registry.Service) -> list[str]:
    """HOST, HOST:PORT, HOST@N or HOST@N-M as api_base URLs."""
    host, _, instances = spec.partition("@")
    has_port = ":" in host.rsplit("]", 1)[-1]
    if instances and has_port:
        raise ValueError(f"{spec!r}: give HOST:PORT or HOST@N, not both")
    if instances:
        first, _, last = instances.partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or int(last or first) < int(first):
            raise ValueError(f"{spec!r}: instances are N or N-M with N <= M")
        ports = [service.port_for(n) for n in range(int(first), int(last or first) + 1)]
    elif has_port:
        host, _, port = host.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"{spec!r}: the port must be a number")
        ports = [int(port)]
    else:
        ports = [service.port]
    if not host:
        raise ValueError(f"{spec!r}: no host")
    return [f"http://{host}:{port}/v1" for port in ports]


def deployment(group: str, model: str, api_base: str, api_key_env: str | None, timeout_s: float) -> dict:
    params = {"model": f"openai/{model}", "api_base": api_base, "timeout": timeout_s, "stream_timeout": timeout_s}
    # Without a key the openai client refuses to start; llmchat ignores it unless keys are configured.
    params["api_key"] = f"os.environ/{api_key_env}" if api_key_env else "none"
    return {
        "model_name": group,
        "litellm_params": params,
        # Unique per group too: a replica may serve as a fallback of its own group.
        "model_info": {"id": f"{group}@{api_base}", "mode": "chat", "supports_function_calling": True},
    }


def served_model(api_bases: list[str], api_key_env: str | None) -> str:
    """The model id the first reachable replica lists in /v1/models."""
    headers = {"Authorization": f"Bearer {os.environ.get(api_key_env, '')}"} if api_key_env else {}
    for base in api_bases:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{base}/models", headers=headers), timeout=5) as r:
                return json.load(r)["data"][0]["id"]
        except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError):
            continue
    raise ValueError("no replica answered /v1/models; pass --model with the name they serve")


def config(args: argparse.Namespace) -> dict:
    service = registry.get(args.service)
    primary = [url for spec in args.hosts for url in replicas(spec, service)]
    fallback = [url for spec in args.fallback for url in replicas(spec, service)]
    model = args.model or served_model(primary + fallback, args.api_key_env)
    group = args.group or model
    model_list = [deployment(group, model, url, args.api_key_env, args.timeout) for url in primary]
    model_list += [deployment(f"{group}-fallback", model, url, args.api_key_env, args.timeout) for url in fallback]
    router = {
        "routing_strategy": args.strategy,
        "num_retries": args.retries,
        # A replica that fails this many calls in a minute sits out cooldown_time seconds.
        "allowed_fails": 1,
        "cooldown_time": args.cooldown,
        "retry_after": 0,
        "timeout": args.timeout,
    }
    if fallback:
        router["fallbacks"] = [{group: [f"{group}-fallback"]}]
    return {
        "model_list": model_list,
        "router_settings": router,
        # Read by the LiteLLM proxy only: it probes each replica (a one-token chat) every interval and
        # routes around the ones that fail. An in-process Router relies on retries and cooldown.
        "general_settings": {
            # The proxy refuses to start without a key for its own clients; it is read from the environment.
            "master_key": "os.environ/LITELLM_MASTER_KEY",
            "background_health_checks": True,
            "health_check_interval": args.health_interval,
            "enable_health_check_routing": True,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hosts", nargs="+", metavar="REPLICA", help="HOST, HOST:PORT, HOST@N or HOST@N-M")
    parser.add_argument("--fallback", action="append", default=[], metavar="REPLICA", help="a fallback replica")
    parser.add_argument("--service", default="llmchat", help="registry service whose ports are used")
    parser.add_argument("--model", help="the name the replicas serve (default: asked from their /v1/models)")
    parser.add_argument("--group", help="the model name clients of the Router use (default: --model)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="least-busy")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failed call, on other replicas")
    parser.add_argument("--cooldown", type=float, default=30, help="seconds a failing replica sits out")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one call may take")
    parser.add_argument("--health-interval", type=int, default=30, help="seconds between the proxy's health checks")
    parser.add_argument("--api-key-env", help="environment variable holding the replicas' API key")
    parser.add_argument("-o", "--out", type=Path, help="write here instead of stdout")
    args = parser.parse_args()
    try:
        text = json.dumps(config(args), indent=2) + "\n"
    except (ValueError, registry.UnknownService) as exc:
        parser.error(str(exc.args[0]))
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
