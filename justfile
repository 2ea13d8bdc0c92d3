# The operator's console: `bin/just --list` shows the recipes (or plain `just` if installed).

default:
    @{{just_executable()}} --list --justfile {{justfile()}}

# create .venv and install llmchat, torch and the bundled model
sync:
    bin/sync

# serve llmchat on 127.0.0.1:2020 (flags pass through: just serve --port 8000)
serve *args: sync
    .venv/bin/llmchat serve {{args}}

# run the test suite
test *args: sync
    .venv/bin/pytest {{args}}

# lint the tree
lint: sync
    .venv/bin/ruff check .

# throughput benchmark against transformers serve (and llama.cpp when installed); flags pass through
bench *args: sync
    .venv/bin/python -m bench.run {{args}}

# decode-step timings of the engine's speed levers (cache kind, dtype; --compile adds torch.compile)
levers *args: sync
    .venv/bin/python -m bench.levers {{args}}
