# The operator's console: `bin/just --list` shows the recipes (or plain `just` if installed).
# Services, their modules and ports come from hrserve/registry.toml (see `_port`). A service may name a
# replica, `llmchat@1`: systemd unit llmchat@1, port 2021, GPU 1 (README "Replicas on one host").

# list the recipes
default:
    @{{just_executable()}} --list --justfile {{justfile()}}

# create .venv from bin/locks/runtime.txt: the platform (one venv serves every service), torch and the bundled model
sync service="llmchat":
    @python3 hrserve/registry.py port {{service}} > /dev/null
    bin/sync

# .venv plus .venv-dev, the test and bench tools (bin/locks/dev.txt), which the units never see
sync-dev:
    bin/sync --dev

# refresh bin/locks/ from pyproject.toml and the package index (commit the result)
lock: sync-dev
    bin/lock

# install the lowest version pyproject.toml allows of every direct dependency and run a short test subset
lowest: sync-dev
    bin/lowest

# run a service in the foreground on its registry port, llmchat@1 on port + 1 (flags pass through: --port 8000)
serve service="llmchat" *args: (sync service)
    .venv/bin/python $(python3 hrserve/registry.py serve-args {{service}}) {{args}}

# fetch a tool-trained model for the tests and benchmark once (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M) and print its path
fetch-model name="qwen2.5-coder-0.5b": sync
    .venv/bin/python bin/fetch-model {{name}}

# run the test suite (pytest flags pass through)
test *args: sync-dev
    .venv-dev/bin/pytest {{args}}

# a longer schemathesis run against the service's own /openapi.json (the suite runs 30 cases per operation)
fuzz examples="300" *args: sync-dev
    LLMCHAT_FUZZ_EXAMPLES={{examples}} .venv-dev/bin/pytest -s tests/llmchat/e2e/test_fuzz.py {{args}}

# on a GPU machine: the GPU tests (tests/gpu: fused pass, quantized loads, CUDA graphs, kernels, sampling,
# /health), verbose, then one table of decode speed per load and forward pass (bench/gpu.py)
gpu-check *args: sync-dev
    .venv-dev/bin/pytest -v tests/gpu {{args}}
    .venv-dev/bin/python -m bench.gpu
    .venv-dev/bin/python -m bench.gpu_decode

# lint the tree (and type-check the engine: [tool.mypy] in pyproject.toml)
lint: sync-dev
    .venv-dev/bin/ruff check .
    .venv-dev/bin/lint-imports
    .venv-dev/bin/mypy

# throughput benchmark against transformers serve (and llama.cpp when installed); flags pass through
bench *args: sync-dev
    .venv-dev/bin/python -m bench.run {{args}}

# mixed load (streams, tools, JSON, disconnects) for a while; reports errors, latency and memory over time
soak *args: sync-dev
    .venv-dev/bin/python -m bench.soak {{args}}

# decode-step timings of the engine's speed levers (cache kind, dtype; --compile adds torch.compile)
levers *args: sync-dev
    .venv-dev/bin/python -m bench.levers {{args}}

# regenerate systemd/*.service from the registry and check them
units:
    bin/gen-systemd.py && bin/gen-systemd.py --check

# install the units for systemctl --user (and point ~/.local/share/hrserve/current at this checkout)
install-units: units sync
    bin/gen-systemd.py --install

# a LiteLLM Router/Proxy config over replicas: HOST, HOST:PORT or HOST@N-M (see README "Scaling out")
litellm-config *args:
    @bin/gen-litellm.py {{args}}

# start a service, or a replica (llmchat@1); returns once it is loaded, warmed up and ready
start service:
    systemctl --user start {{service}}

# stop a service (it drains in-flight requests first)
stop service:
    systemctl --user stop {{service}}

# restart a service
restart service:
    systemctl --user restart {{service}}

# systemd's view of a service
status service:
    systemctl --user status {{service}}

# follow a service's log (journalctl flags pass through, e.g. --since today)
logs service *args:
    journalctl --user -u {{service}} -f {{args}}

# the service's /health
health service="llmchat":
    curl -sS http://127.0.0.1:$(python3 hrserve/registry.py port {{service}})/health

# a local Jaeger for looking at traces: UI on http://localhost:16686, OTLP on 4317/4318 (needs Docker)
traces:
    docker run --rm --name hrserve-jaeger -p 16686:16686 -p 4317:4317 -p 4318:4318 jaegertracing/jaeger

# print a service's port from the registry (fails for unknown services)
_port service:
    @python3 hrserve/registry.py port {{service}}
