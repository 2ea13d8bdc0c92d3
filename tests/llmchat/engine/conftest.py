"""What the engine tests share: the bundled model in float32, and one-message chat prompts."""

import dataclasses

import pytest

from llmchat.engine.loader import ModelConfig, load_model
from llmchat.settings import Settings


@pytest.fixture(scope="module")
def loaded():
    # float32: in bfloat16 a row's attention sums round differently beside longer (padded) rows, so a
    # near-tie can flip a greedy token; the engine's bookkeeping is what these modules check. For the same
    # reason no checkpoint, so no 4-bit weights (they round activations, and serve small batches where large
    # ones take the dense matmuls; test_int4.py has them).
    model = load_model(ModelConfig("bundled", device="cpu", dtype="float32", cache_dir=Settings().cache_dir))
    return dataclasses.replace(model, checkpoint=None)
