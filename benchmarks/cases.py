"""What is benchmarked: one ``Case`` per (op, shape, mode), and the random inputs of a case.

Shared by the runner (``run.py``) and the pytest-benchmark tests (``test_bench_ops.py``).

Sets of cases:
- ``scaled_residual`` epilogue at a few (B, n), forward and forward+backward.
- depth sweep: ``ResidualStack`` at depths 64..1024 for (n, B) = (32, 64) and (64, 128), training
  step (``fwd+bwd``: forward and backward of ``loss = y.square().mean()``) and inference (``fwd``).
- target table rows: training step at five (n, B, L), each with speed-up targets for a fused backend
  (docs/design.md §6.6), and at three (n, m, B, L) of ``ResidualMLPStack`` (hidden width m).
- checkpoint sweep (``checkpoint_sweep.py``, not part of the runner): training step of ``ResidualStack``
  at (n, B) = (128, 1024) and depths 2^10..2^16.
All stacks: relu, no bias, float32, Depth-muP branch scale 1/sqrt(L); ``ResidualStack`` block "post" with mean
subtraction, ``ResidualMLPStack`` without (the op's default).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from dmup_kernels import DEPTH_MUP

OPS: tuple[str, ...] = ("scaled_residual", "residual_stack", "residual_mlp_stack")
STACK_OPS: tuple[str, ...] = ("residual_stack", "residual_mlp_stack")
"""The ops of many layers: their cases have a depth, weights, a branch scale and GEMM flops."""
MODES: tuple[str, ...] = ("fwd", "fwd+bwd")

SCALED_RESIDUAL_SCALE = 0.5
"""Branch scale used by the scaled_residual cases (stacks use DEPTH_MUP.branch_scale(depth))."""

BIAS_STD = 0.1
"""Standard deviation of random stack biases: non-zero (never-zero inputs) but small next to h ~ N(0, 1)."""


@dataclass(frozen=True)
class TableRow:
    """One row of the target table (docs/design.md §6.6): a training step and the speed-ups a fused
    backend must reach."""

    width: int
    batch: int
    depth: int
    target_vs_eager: float
    target_vs_compile: float
    hidden_width: int = 0
    """0: a row of ResidualStack; m >= 1: of ResidualMLPStack with hidden width m."""

    def case(self, compile: bool) -> Case:
        """The training step this row times."""
        mlp = self.hidden_width > 0
        return Case(
            "residual_mlp_stack" if mlp else "residual_stack",
            self.batch,
            self.width,
            self.depth,
            "fwd+bwd",
            mean_subtract=not mlp,
            hidden_width=self.hidden_width,
            tags=("table",),
            compile=compile,
            targets=(self.target_vs_eager, self.target_vs_compile),
        )


TABLE_ROWS: tuple[TableRow, ...] = (
    TableRow(32, 64, 1024, 10.0, 5.0),
    TableRow(64, 128, 512, 4.0, 2.5),
    TableRow(128, 256, 256, 2.0, 1.4),
    TableRow(256, 512, 128, 1.2, 1.1),
    TableRow(128, 8, 256, 4.0, 3.0),
    TableRow(32, 64, 512, 6.0, 3.0, hidden_width=128),
    TableRow(64, 128, 256, 3.0, 2.0, hidden_width=256),
    TableRow(128, 256, 128, 1.5, 1.2, hidden_width=512),
)

CHECKPOINT_COST_TARGET = 1.35
"""A training step with checkpoint="sqrt" should take at most this times the save-all step (target rows)."""

SWEEP_SHAPES: tuple[tuple[int, int], ...] = ((32, 64), (64, 128))  # (width n, batch B)
SWEEP_DEPTHS: tuple[int, ...] = (64, 128, 256, 512, 1024)
SWEEP_DEPTHS_QUICK: tuple[int, ...] = (64, 256)

SCALED_RESIDUAL_SHAPES: tuple[tuple[int, int], ...] = ((64, 64), (256, 128), (1024, 256), (4096, 512))  # (B, n)
SCALED_RESIDUAL_SHAPES_QUICK: tuple[tuple[int, int], ...] = ((64, 64), (1024, 256))

CHECKPOINT_SWEEP_WIDTH = 128
CHECKPOINT_SWEEP_BATCH = 1024
CHECKPOINT_SWEEP_DEPTHS: tuple[int, ...] = tuple(2**k for k in range(10, 17))
"""Depths of the checkpoint sweep. At (n, B) = (128, 1024) one state of the stream is 0.5 MiB, and a
training step that saves every layer peaks at about 1.7 MiB per layer on cpp and 2.4 MiB on eager
(measured at L=1024), so the deepest stacks need far more memory than a workstation has without
checkpointing."""

COMPILE_MAX_DEPTH = 256
"""Full run: torch.compile is timed for every case with depth <= this, and for every target table row.
Compile time grows with depth (~25 s at L=64, 70-90 s at L=256, 330 s at L=1024 for a training step on
2 cores), so compiling every deep case would take the full run well past 20 minutes."""
COMPILE_MAX_DEPTH_QUICK = 64
"""--quick: torch.compile only for cases with depth <= this (table rows included)."""


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration. ``depth`` is 1 for ``scaled_residual``; ``hidden_width`` is the m of
    ``residual_mlp_stack`` (0 for the other ops).

        ``tags`` say which sets the case belongs to ("scaled_residual", "sweep", "table"); ``compile`` says
        whether this run times the torch.compile peer on it; ``targets`` holds the speed-up targets
        (vs eager, vs compile) of a table row.
    """

    op: str
    batch: int
    width: int
    depth: int = 1
    mode: str = "fwd+bwd"
    activation: str = "relu"
    block: str = "post"
    mean_subtract: bool = True
    bias: bool = False
    dtype: torch.dtype = torch.float32
    hidden_width: int = 0
    tags: tuple[str, ...] = field(default=(), compare=False)
    compile: bool = field(default=True, compare=False)
    targets: tuple[float, float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}; got {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.op == "scaled_residual" and (self.depth != 1 or self.bias or self.block != "post"):
            raise ValueError("scaled_residual cases have depth 1, no bias and block 'post'")
        if (self.op == "residual_mlp_stack") != (self.hidden_width > 0):
            raise ValueError("residual_mlp_stack cases, and only they, have a hidden_width >= 1")

    @property
    def name(self) -> str:
        """Short unique name, e.g. ``residual_stack/n64/B128/L512/fwd+bwd`` or
        ``residual_mlp_stack/n32/m128/B64/L512/noMS/fwd+bwd`` (``--only`` matches it)."""
        parts = [self.op, f"n{self.width}"] + ([f"m{self.hidden_width}"] if self.hidden_width else [])
        parts.append(f"B{self.batch}")
        if self.op in STACK_OPS:
            parts.append(f"L{self.depth}")
        flavour = []
        if self.activation != "relu":
            flavour.append(self.activation)
        if self.op == "residual_stack" and self.block != "post":
            flavour.append(self.block)
        if not self.mean_subtract:
            flavour.append("noMS")
        if self.bias:
            flavour.append("bias")
        if self.dtype != torch.float32:
            flavour.append(str(self.dtype).removeprefix("torch."))
        return "/".join(parts + flavour + [self.mode])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def scale(self) -> float:
        """The branch scale s: Depth-muP 1/sqrt(L) for stacks."""
        if self.op in STACK_OPS:
            return DEPTH_MUP.branch_scale(self.depth)
        return SCALED_RESIDUAL_SCALE

    @property
    def gemms_per_layer(self) -> int:
        """GEMMs of one layer (docs/design.md §6.5): 1 forward, 3 for a training step (h, dx, dW); twice as
        many for an MLP block, which has two weights."""
        return (3 if self.mode == "fwd+bwd" else 1) * (2 if self.hidden_width else 1)

    @property
    def flops(self) -> int | None:
        """GEMM flops of one call (2*B*n*n per GEMM, 2*B*n*m for an MLP block's); None for ops without a GEMM."""
        if self.op not in STACK_OPS:
            return None
        return 2 * self.batch * self.width * (self.hidden_width or self.width) * self.depth * self.gemms_per_layer

    @property
    def seed(self) -> int:
        """A different, reproducible seed per case."""
        return zlib.crc32(self.name.encode())


def _merge(cases: list[Case]) -> list[Case]:
    """One case per configuration; a configuration listed twice keeps the union of its tags."""
    merged: dict[Case, Case] = {}
    for case in cases:
        if case in merged:
            old = merged[case]
            tags = old.tags + tuple(tag for tag in case.tags if tag not in old.tags)
            case = replace(old, tags=tags, compile=old.compile or case.compile, targets=old.targets or case.targets)
        merged[case] = case  # an existing key keeps its place; the value carries the merged fields
    return list(merged.values())


def runner_cases(quick: bool = False, compile_all: bool = False) -> list[Case]:
    """The cases of ``python -m benchmarks.run`` (``--quick``: fewer shapes and depths).

    torch.compile is timed on a case when ``compile_all``, or when its depth is at most
    ``COMPILE_MAX_DEPTH`` (``COMPILE_MAX_DEPTH_QUICK`` with ``quick``), or, in the full run, when it
    is a target table row.
    """
    max_depth = COMPILE_MAX_DEPTH_QUICK if quick else COMPILE_MAX_DEPTH

    def compiles(depth: int, table: bool) -> bool:
        return compile_all or depth <= max_depth or (table and not quick)

    cases: list[Case] = []
    for batch, width in SCALED_RESIDUAL_SHAPES_QUICK if quick else SCALED_RESIDUAL_SHAPES:
        for mode in MODES:
            cases.append(Case("scaled_residual", batch, width, mode=mode, tags=("scaled_residual",)))
    for width, batch in SWEEP_SHAPES:
        for depth in SWEEP_DEPTHS_QUICK if quick else SWEEP_DEPTHS:
            for mode in ("fwd+bwd", "fwd"):
                cases.append(
                    Case("residual_stack", batch, width, depth, mode, tags=("sweep",), compile=compiles(depth, False))
                )
    for row in TABLE_ROWS:
        cases.append(row.case(compiles(row.depth, True)))
    return _merge(cases)


def checkpoint_sweep_case(depth: int) -> Case:
    """The checkpoint sweep's training step at ``depth`` (any depth: the sweep also measures shallow
    stacks to estimate the memory of deep ones)."""
    return Case(
        "residual_stack", CHECKPOINT_SWEEP_BATCH, CHECKPOINT_SWEEP_WIDTH, depth, "fwd+bwd", tags=("checkpoint_sweep",)
    )


def checkpoint_sweep_cases(max_depth: int = CHECKPOINT_SWEEP_DEPTHS[-1]) -> list[Case]:
    """The checkpoint sweep's cases with depth at most ``max_depth``, shallowest first."""
    return [checkpoint_sweep_case(depth) for depth in CHECKPOINT_SWEEP_DEPTHS if depth <= max_depth]


def pytest_cases() -> list[Case]:
    """Small cases for the pytest-benchmark tests: two shapes per op, training step."""
    return [
        Case("scaled_residual", 64, 64, tags=("pytest",)),
        Case("scaled_residual", 1024, 256, tags=("pytest",)),
        Case("residual_stack", 64, 32, 16, tags=("pytest",)),
        Case("residual_stack", 128, 64, 16, tags=("pytest",)),
        Case("residual_mlp_stack", 64, 32, 16, mean_subtract=False, hidden_width=128, tags=("pytest",)),
    ]


@dataclass
class Problem:
    """The random tensors of one case, in the case's dtype on the CPU.

    ``inputs`` are the forward arguments, in order (``x`` and, for scaled_residual, ``branch_out``);
    ``params`` are the op's parameters by their module names (``weight`` and ``bias`` of a stack; ``weight1``,
    ``weight2``, ``bias1``, ``bias2`` of an MLP stack), copied into every variant's module so that all variants
    (and the float64 reference) see the same values.
    """

    case: Case
    inputs: dict[str, Tensor]
    params: dict[str, Tensor]

    def leaf_inputs(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> list[Tensor]:
        """Fresh leaf copies of the inputs; they require grad in fwd+bwd mode."""
        grad = self.case.mode == "fwd+bwd"
        return [
            t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_(grad)
            for t in self.inputs.values()
        ]


NORMAL_DRAW_ELEMENTS = 1 << 22
"""make_problem draws its float64 normals this many at a time (32 MiB) and casts each piece into the
case's dtype, so that a deep stack's weight never exists whole in float64 (8 GiB at n=128, L=2^16, on top
of the 4 GiB float32 result). A multiple of 16: torch's CPU sampler transforms normals in blocks of 16,
so pieces of such sizes give the same values as one draw of the whole tensor."""


def make_problem(case: Case) -> Problem:
    """Random inputs for ``case`` (fresh seed per case, never zeros, docs/design.md §5.2).

    x and branch_out ~ N(0, 1); stack weights ~ N(0, 1/fan_in) (the muP init); biases ~ N(0, BIAS_STD^2).
    Drawn in float64 (NORMAL_DRAW_ELEMENTS at a time) and rounded to the case's dtype.
    """
    gen = torch.Generator().manual_seed(case.seed)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        out = torch.empty(shape, dtype=case.dtype)
        for piece in out.view(-1).split(NORMAL_DRAW_ELEMENTS):
            piece.copy_(torch.randn(piece.numel(), generator=gen, dtype=torch.float64) * std)
        return out

    inputs = {"x": randn(case.batch, case.width)}
    params: dict[str, Tensor] = {}
    n, m, depth = case.width, case.hidden_width, case.depth
    if case.op == "scaled_residual":
        inputs["branch_out"] = randn(case.batch, n)
    elif case.op == "residual_stack":
        params["weight"] = randn(depth, n, n, std=1.0 / math.sqrt(n))
        if case.bias:
            params["bias"] = randn(depth, n, std=BIAS_STD)
    else:
        params["weight1"] = randn(depth, m, n, std=1.0 / math.sqrt(n))
        params["weight2"] = randn(depth, n, m, std=1.0 / math.sqrt(m))
        if case.bias:
            params["bias1"] = randn(depth, m, std=BIAS_STD)
            params["bias2"] = randn(depth, n, std=BIAS_STD)
    return Problem(case, inputs, params)
