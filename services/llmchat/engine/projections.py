"""The fused pass's matmuls: one projection or several fused into one, dense (plain or prepacked for oneDNN) or
from a 4-bit copy for steps of few rows (or every step); and which of the two wins up to how many rows on this
machine.
"""

import logging
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from llmchat.engine import cpu, dot8, int4
from llmchat.engine.choices import Choices
from llmchat.engine.quantized import Modules, dequantized

log = logging.getLogger("llmchat.engine.projections")


ALL_ROWS = sys.maxsize  # Linear's packed_rows where every step takes the prepacked weights


class Linear:
    """One projection, or several fused into one: a plain matmul, or oneDNN's on a prepacked weight."""

    def __init__(
        self,
        linears: list[torch.nn.Linear],
        packed_rows: int,
        grid: int4.Grid | None = None,
        dequantize_to: torch.dtype | None = None,
    ) -> None:
        """`packed_rows`: steps of up to this many rows use a copy of the weights prepacked for oneDNN, larger ones
        the plain weights (0: none; ALL_ROWS: every step, and the plain weights are not kept here).
        `grid`: the weights' 4-bit form, used for steps of up to `int4_rows` rows (set once measured).
        `dequantize_to`: bitsandbytes 4-bit layers, whose weights are dequantized once into this dtype."""
        self.int4 = grid
        self.int4_rows = 0
        weights = [dequantized(m, dequantize_to) if dequantize_to else m.weight.detach() for m in linears]
        biases = [m.bias for m in linears]
        self.bias: torch.Tensor | None
        if any(b is not None for b in biases):
            zeros = [w.new_zeros(w.shape[0]) for w in weights]
            self.bias = torch.cat([z if b is None else b.detach() for b, z in zip(biases, zeros, strict=True)])
            self.bias = self.bias.to(weights[0].dtype)
        else:
            self.bias = None
        self.out_features, self.in_features = sum(w.shape[0] for w in weights), weights[0].shape[1]
        self.packed_rows = packed_rows
        self.dequantized = dequantize_to is not None  # a copy beside the model's own 4-bit weights
        self.packed_weight: torch.Tensor | None = None  # made by pack, for the steps that take it
        # The fused weight is made at its first use (`weight`): a kind whose 4-bit weights serve every step, known
        # from kept choices, never makes one (0.94 GB of Qwen2.5-0.5B's q/k/v and gate/up in float32).
        self._parts: list[torch.Tensor] | None = weights
        self._weight: torch.Tensor | None = None
        if self.dequantized:  # copies already: fused at once, not held twice
            self._weight = self.weight
        self._fused = linears if len(linears) > 1 and not dequantize_to else []  # see settle

    @property
    def weight(self) -> torch.Tensor | None:
        """The dense weight, the projections fused into one; None where settle dropped it."""
        if self._weight is None and self._parts is not None:
            self._weight = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts = None
        return self._weight

    def _drop_weight(self) -> None:
        self._weight, self._parts = None, None

    def pack(self) -> None:
        """The copy prepacked for oneDNN, where steps take it: made once the 4-bit crossover is known (settle), or
        for a projection whose crossover is timed, so that a kind whose 4-bit weights serve every step never
        holds one (1.4 GB for Qwen2.5-0.5B's layers in float32)."""
        weight = self.weight if self.packed_rows and self.packed_weight is None else None
        if weight is not None:
            # The batch-size hint only tunes the layout; any number of rows can use the packed weight.
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)

    def settle(self, max_rows: int | None = None) -> None:
        """Once `int4_rows` is set: where every step takes the 4-bit weights, the dense copies go (the model's own
        projections keep their weights, which a checkpoint mapped from disk holds in the page cache rather than
        in the process's own memory: 0.94 GB less of it for Qwen2.5-0.5B in float32); else the model's own
        projections become views of the fused weight, so it is not held twice. `max_rows`: the most rows a step
        gives this matmul, for the logits' (which never take a prompt's rows); where the 4-bit weights take that
        many, the prepacked copy goes too (0.54 GB for Qwen2.5-0.5B), and a rare larger step (a lone request of
        more choices) takes the plain weight."""
        fused, self._fused = self._fused, []
        if self.int4_rows == ALL_ROWS:
            self.packed_weight = None
            self._drop_weight()
            return
        if max_rows is not None and self.int4_rows >= max_rows:
            self.packed_weight = None
            return
        self.pack()
        if self.packed_rows == ALL_ROWS:  # every step takes the packed weight: the plain one is not kept here
            self._drop_weight()
            return
        weight = self.weight
        assert weight is not None  # dropped only above
        offset = 0
        for m in fused:
            rows = m.weight.shape[0]
            m.weight.data = weight[offset : offset + rows]
            offset += rows

    @property
    def packed(self) -> bool:
        return self.packed_weight is not None

    @property
    def grid(self) -> int4.Grid:
        """`int4`, of a projection known to keep a 4-bit form."""
        assert self.int4 is not None
        return self.int4

    @property
    def extra_bytes(self) -> int:
        """Memory this projection holds beyond the model's own weights (prepacked and 4-bit copies)."""
        extra = self.packed_weight.nbytes if self.packed_weight is not None else 0
        extra += self._weight.nbytes if self.dequantized and self._weight is not None else 0
        return extra + (self.int4.nbytes if self.int4 is not None else 0)

    def __call__(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """A prompt's rows take one kernel whatever their number, so its keys and values do not depend on its
        chunking: the 4-bit one where it serves every row count, else the dense one."""
        flat = x.reshape(-1, x.shape[-1])
        four_bit = flat.shape[0] <= self.int4_rows and (not prefill or self.int4_rows == ALL_ROWS)
        out = self.quantized(flat) if four_bit else self.dense(flat)
        return out.view(*x.shape[:-1], self.out_features)

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None or flat.shape[0] > self.packed_rows:
            assert self.weight is not None  # kept unless every step takes the packed weight
            return F.linear(flat, self.weight, self.bias)
        if torch.compiler.is_compiling():
            return packed_linear(flat, self.packed_weight, self.bias)
        return prepacked(flat, self.packed_weight, self.bias)

    def quantized(self, flat: torch.Tensor) -> torch.Tensor:
        assert self.int4 is not None  # int4_rows is 0 without it
        out = self.int4.matmul(flat)
        return out if self.bias is None else out + self.bias


@torch.library.custom_op("llmchat::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's matmul on a prepacked weight, opaque to torch.compile: inductor's own lowering of it fails on
    dynamic shapes (LLMCHAT_COMPILE on AMX CPUs), and the matmul is one call either way."""
    return prepacked(x, weight, bias)


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def checkpoint_grids(
    model: torch.nn.Module, projections: list[list[torch.nn.Linear]], checkpoint: Path | None, gguf: Path | None
) -> list[int4.Grid | None]:
    """Each projection's 4-bit form from the checkpoint (and the GGUF it came from), by its modules' parameter
    names (None without one)."""
    if checkpoint is None:
        return [None] * len(projections)
    # By parameter, so a logits matmul tied to the embedding finds the embedding's name in the checkpoint.
    names = {id(param): name for name, param in model.named_parameters()}
    return int4.load_grids(checkpoint, [[names[id(m.weight)] for m in linears] for linears in projections], gguf)


# Kernel choices and crossovers measured in this process, for forward passes built without kept choices: engines
# loaded again (tests) reuse them.
_measured = Choices()


def kept(choices: Choices | None) -> Choices:
    """Where a choice goes: `choices`, or by default this process's."""
    return _measured if choices is None else choices


# Projections whose crossovers are timed apart, in the order fused_forward._projections lists a layer's (the
# logits matmul comes last): their shapes differ, and a Q8_0 weight's two grids take the input twice. Measured on
# AVX2, the 4-bit weights won up to 12 rows for the logits, 16 for down, 32 for gate/up.
ROLES = ("q/k/v", "o", "gate/up", "down")
LOGITS = "logits"

# Rows a prompt chunk is timed at where the 4-bit weights won at every candidate row count (the CPU's default
# max_batched_tokens): winning there too, they serve every step, prompts included (Linear's int4_rows ALL_ROWS).
PROMPT_ROWS = 512

# Dense weight bytes timed per role: more than a CPU cache holds, as in a decode step, and for a large model
# only its first layers, so that timing stays within a second or two.
CROSSOVER_BYTES = 64 * 2**20


# Rows the dense matmuls are timed at, prepacked and plain, in order until the plain ones win: prompt chunks beside
# decoding rows, up to the longest step the CPU takes by default (prefill always takes the dense matmuls).
PACKING_ROWS = (16, 32, 64, 128, 256, 512)


def packed_rows(
    projections: list[list[torch.nn.Linear]], roles: list[str], dtype: torch.dtype, choices: Choices | None = None
) -> tuple[int, str]:
    """Up to how many rows oneDNN's matmul on weights prepacked once beats torch's plain one (MKL's sgemm) on this
    CPU (0: never; ALL_ROWS: at every count timed), and why. The flags do not say: on a 2-core AMD EPYC (AVX2)
    Qwen2.5-Coder-0.5B's float32 MLP took 0.56x MKL's time prepacked at 16 rows, 0.78x at 64, the same at 256
    and 1.07x at 512.
    Timed on the MLP's projections (most of a layer's weights), kept in `choices` like the 4-bit crossovers. The
    copy must fit in half the free memory."""
    import psutil

    copy = sum(m.weight.nbytes for linears in projections for m in linears)
    if copy > psutil.virtual_memory().available // 2:
        return 0, f"not prepacked: a copy ({copy / 2**30:.1f} GiB) would take over half the free memory"
    try:
        timed = [_dense_pairs(projections, roles, role) for role in ("gate/up", "down")]
    except RuntimeError as exc:  # bfloat16 without AVX-512 (or avx_ne_convert): oneDNN cannot prepack it
        return 0, f"not prepacked: {str(exc).splitlines()[0]}"
    shapes = ", ".join(f"{len(pairs)} x {width}" for pairs, width in timed)
    key = f"dense {str(dtype).removeprefix('torch.')} matmuls prepacked for oneDNN up to rows: {shapes}"
    rows = kept(choices).get(key, partial(_measure_packing, timed, dtype))
    if not rows:
        return 0, f"not prepacked: slower at {PACKING_ROWS[0]} rows"
    return (ALL_ROWS, "prepacked") if rows == PACKING_ROWS[-1] else (rows, f"prepacked up to {rows} rows")


def _dense_pairs(
    projections: list[list[torch.nn.Linear]], roles: list[str], role: str
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Up to CROSSOVER_BYTES of one role's projections as (plain, prepacked) fused weights, and their input width."""
    group = [linears for linears, r in zip(projections, roles, strict=True) if r == role]
    group = group[: max(1, CROSSOVER_BYTES // sum(m.weight.nbytes for m in group[0]))]
    weights = [torch.cat([m.weight.detach() for m in linears]) for linears in group]
    return [(w, torch.ops.mkldnn._reorder_linear_weight(w, 16)) for w in weights], group[0][0].in_features


def _measure_packing(timed: list[tuple[list, int]], dtype: torch.dtype) -> int:
    """The most of PACKING_ROWS at which the prepacked matmuls (both roles together) beat the plain ones."""
    return int4.crossover(partial(_both, timed, dtype=dtype), "prepacked dense matmuls", PACKING_ROWS, "plain")


def _both(timed: list[tuple[list, int]], rows: int, dtype: torch.dtype) -> tuple[float, float]:
    times = [_seconds(weights, torch.randn(rows, width).to(dtype)) for weights, width in timed]
    return sum(plain for plain, _ in times), sum(packed for _, packed in times)


def _seconds(
    weights: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, repeats: int = 3
) -> tuple[float, float]:
    """Best-of seconds for x through every (plain, prepacked) weight, plain and prepacked."""
    plain = packed = float("inf")
    with torch.inference_mode():
        prepacked(x, weights[0][1])  # oneDNN builds its kernel for these rows on first use
        for _ in range(repeats):  # in turns, so that a burst of other work slows both alike
            plain = min(plain, cpu.best_of(lambda: [F.linear(x, w) for w, _ in weights], 1))
            packed = min(packed, cpu.best_of(lambda: [prepacked(x, w) for _, w in weights], 1))
    return plain, packed


def prepacked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's matmul on a weight prepacked by torch.ops.mkldnn._reorder_linear_weight."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def measure_int4_rows(
    linears: list[Linear | Modules], roles: list[str], dtype: torch.dtype, choices: Choices | None = None
) -> dict[str, int]:
    """Each role's crossover of the 4-bit and dense matmuls on this machine (of the roles with 4-bit weights),
    after moving a role's grids to torch's int4 kernel where that is faster at one row than llmchat's.
    `choices` keeps both per role and shape, so a restart (or a second engine) makes the same ones (default: kept
    in this process)."""
    choices = kept(choices)
    crossovers = {}
    for role in dict.fromkeys(roles):
        # Only a Linear keeps a 4-bit form (a Modules' int4 is None).
        grids = [
            p for p, r in zip(linears, roles, strict=True) if r == role and isinstance(p, Linear) and p.int4 is not None
        ]
        if not grids:
            continue
        first = grids[0]
        group = grids[: max(1, CROSSOVER_BYTES // (first.in_features * first.out_features * dtype.itemsize))]
        layout = "prepacked" if first.packed_rows else "plain"
        # The kernel first meant to multiply them is part of the key: where llmchat's can no longer be built (no
        # compiler), torch's must not inherit its crossover.
        key = (
            f"4-bit {role}: {len(group)} x {first.out_features}x{first.in_features}, {layout} {dtype}, "
            f"from {first.grid.kernel}, timed up to {PROMPT_ROWS} rows"
        )
        chosen = choices.get(key, partial(_measure_role, group, role, dtype))
        if chosen["kernel"] == int4.TORCH_KERNEL:
            on_torch_kernel(grids)
        crossovers[role] = chosen["rows"]
    return crossovers


def _measure_role(group: list[Linear], role: str, dtype: torch.dtype) -> dict:
    """The kernel for one kind of projection (timed on `group`, a few of them) and its crossover."""
    first = group[0]
    for p in group:
        p.pack()
    # The kernels compared on at most CROSSOVER_BYTES of the weights: torch's takes a copy in its own layout, and of a
    # whole logits matmul (151,936 x 896) making it took 2.8 GB more memory at its peak (the load's largest).
    outputs = max(dot8.TILE, CROSSOVER_BYTES // (first.in_features * dtype.itemsize) // dot8.TILE * dot8.TILE)
    if first.grid.kernel == int4.DOT8_KERNEL and int4.torch_kernel_is_faster(
        [p.grid.head(outputs) for p in group], first.in_features, dtype
    ):
        on_torch_kernel(group)  # before the crossover is timed, which then times torch's kernel
    timer = int4.timer([(p.dense, p.quantized) for p in group], first.in_features, dtype)
    rows = int4.crossover(timer, f"4-bit {role}")
    # The logits matmul takes each sequence's last row alone, never a prompt's: its row count stays a crossover. Only
    # llmchat's kernel is known to give a row the same result beside any rows, as a prompt's kernel must (tested).
    every = role != LOGITS and first.grid.kernel == int4.DOT8_KERNEL and rows == int4.CANDIDATE_ROWS[-1]
    if every and int4.crossover(timer, f"4-bit {role}", (PROMPT_ROWS,)):
        rows = ALL_ROWS
    return {"kernel": first.grid.kernel, "rows": rows}


def on_torch_kernel(linears: list[Linear]) -> None:
    """Their grids multiplied by torch's int4 kernel from now on (those it can take)."""
    for p in linears:
        if p.grid.kernel == int4.TORCH_KERNEL:
            continue
        levels = p.grid.dot8_levels  # packed again from the kernel's bytes: once
        if int4.torch_takes(levels):
            p.int4 = int4.Grid(*levels, dot8_kernel=False)


def four_bit_kind(linears: list[Linear | Modules], roles: list[str]) -> str:
    """How /health names the 4-bit weights in use: "up to 24 rows", or each role's row count where they differ (the
    roles that take them in every step first), and the kernel that multiplies them ("" when none are kept)."""
    used = {role: p.int4_rows for p, role in zip(linears, roles, strict=True) if p.int4 is not None}
    num_int4 = sum(p.int4 is not None for p in linears)
    if not used:
        return ""
    every = [role for role, n in used.items() if n == ALL_ROWS]
    up_to = {role: n for role, n in used.items() if n != ALL_ROWS}
    parts = [f"in every step for {', '.join(every)}"] if every and up_to else ["in every step"] if every else []
    if len(set(up_to.values())) == 1:
        parts.append(f"up to {next(iter(up_to.values()))} rows" + (f" for {', '.join(up_to)}" if every else ""))
    elif up_to:
        parts.append(f"up to {', '.join(f'{role} {n}' for role, n in up_to.items())} rows")
    limit = ", ".join(parts)
    kernels = dict.fromkeys(p.int4.kernel for p in linears if p.int4 is not None)
    kernel = ", ".join(kernels)
    if int4.DOT8_KERNEL in kernels:  # 8-bit inputs where the model allows them, Q8_0's 16-bit (input_rounding.py)
        bits = sorted(
            {8 if p.int4.byte_inputs else 16 for p in linears if p.int4 and p.int4.kernel == int4.DOT8_KERNEL}
        )
        kernel = kernel.replace(int4.DOT8_KERNEL, f"{int4.DOT8_KERNEL} of {'- and '.join(map(str, bits))}-bit inputs")
    if int4.DOT8_KERNEL not in kernels and (why := dot8.unavailable()):
        kernel += f": {why}"
    return f", 4-bit weights {limit} ({num_int4} of {len(linears)} matmuls, {kernel})"
