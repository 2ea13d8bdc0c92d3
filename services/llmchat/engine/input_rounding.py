"""Whether a model's 4-bit matmuls round their inputs to 8 bits or to 16, decided once per model at load.

llmchat's kernel (dot8.py) multiplies a weight whose levels lie in -32..31 (every GGUF type but Q8_0) by inputs
rounded to one byte per group of 32, as llama.cpp does: 0.65 to 0.8x the time of inputs kept to about 16 bits, at
4 to 512 rows (2-core AVX2 host). What that rounding costs depends on the model. As the mean KL divergence of the
next-token distributions from the 16-bit inputs' (teacher-forced, a code answer): 8e-5 for Qwen2.5-Coder-0.5B's
Q4_K_M, below the 1.3e-4 that rounding its weights to bfloat16 costs; 1e-2 for the bundled SmolLM2-135M's Q4_1,
15x what bfloat16 weights cost it, and its greedy answer changed: its few huge activations leave the other inputs
of their groups hardly a level each. So the model's own logits decide, at load: a forward pass over
CALIBRATION_TOKENS seeded random token ids with either rounding, and 8-bit inputs only where the divergence stays
within MAX_KL. (No tokenizer needed; random text makes a model less sure, so both divergences come out larger
there: 1.2e-3 and 2.8e-2.)
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from llmchat.engine import int4
from llmchat.engine.choices import Choices

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("llmchat.engine.input_rounding")

CALIBRATION_TOKENS = 128
# Between the two models above, 4x above the one 8-bit inputs cost nothing measurable and 6x below the other.
MAX_KL = 5e-3


def choose(
    model: "PreTrainedModel",
    projections: list[list[torch.nn.Linear]],
    grids: list["int4.Grid | None"],
    choices: Choices,
) -> None:
    """Lays out `grids` (each projection's, or None) for 8-bit inputs where the model's logits allow it, else for
    16-bit ones."""
    candidates = [g for g in grids if g is not None and g.byte_inputs]
    if not candidates:
        return
    key = f"8-bit inputs: {len(candidates)} of {len(grids)} matmuls, KL over {CALIBRATION_TOKENS} tokens"
    try:
        divergence = choices.get(key, lambda: divergence_of_byte_inputs(model, projections, grids))
    except Exception as exc:  # noqa: BLE001 (a model the check cannot run through still loads, on 16-bit inputs)
        log.warning("could not compare 8- and 16-bit inputs through the model: %s", exc)
        divergence = float("inf")
    on = divergence <= MAX_KL
    log.info(
        "4-bit matmuls round their inputs to %s bits (next-token KL divergence %.2g with 8, at most %.2g taken)",
        8 if on else 16,
        divergence,
        MAX_KL,
    )
    for grid in candidates:  # each laid out again only where the check (or a fresh load) left it otherwise
        if grid.byte_inputs != on:
            grid.round_inputs_to_bytes(on)


def divergence_of_byte_inputs(
    model: "PreTrainedModel", projections: list[list[torch.nn.Linear]], grids: list["int4.Grid | None"]
) -> float:
    """Mean KL divergence of the model's next-token distributions with its grids' inputs rounded to 8 bits, from
    those with 16-bit inputs, over seeded random token ids (a model's largest activations come with its first
    token and its structure, whatever the text). Leaves the grids on 16-bit inputs: 8-bit ones are run first, so a
    model that keeps 16 bits lays its grids out once more, not twice."""
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, CALIBRATION_TOKENS), generator=generator).to(model.device)
    byte_grids = [g for g in grids if g is not None and g.byte_inputs]
    logits = []
    with _through_grids(projections, grids), torch.inference_mode():
        for on in (True, False):
            for grid in byte_grids:
                grid.round_inputs_to_bytes(on)
            logits.append(torch.log_softmax(model(ids).logits[0].float(), dim=-1))
    rounded, exact = logits
    return float((exact.exp() * (exact - rounded)).sum(-1).mean())


@contextmanager
def _through_grids(projections: list[list[torch.nn.Linear]], grids: list["int4.Grid | None"]) -> Iterator[None]:
    """Every projection with a grid computed through it alone while inside, its dense weight never read (a fused
    grid's first module computes all of its modules' outputs, the others take their part)."""
    patched = []
    for linears, grid in zip(projections, grids, strict=True):
        if grid is None:
            continue
        parts: list[torch.Tensor] = []

        def forward(x, index, linears=linears, grid=grid, parts=parts):
            if index == 0:
                parts[:] = grid.matmul(x.reshape(-1, x.shape[-1])).split([m.out_features for m in linears], dim=1)
            part = parts[index].reshape(*x.shape[:-1], -1)
            bias = linears[index].bias
            return part if bias is None else part + bias

        for index, module in enumerate(linears):
            setattr(module, "forward", lambda x, i=index, f=forward: f(x, i))  # noqa: B010 (an instance's own)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's again
