"""Sample inputs of every op test (the pytorch/extension-cpp ``sample_inputs`` style).

Each generator has two layers:
- ``*_SPECS``: small, hashable descriptions of a case (shapes, layout, activation, ...), used to
  parametrize tests so that every case gets its own pytest id and its own seed;
- ``make_*_case(spec, dtype, seed)``: turns one spec into tensors (random, never zero);
- ``sample_inputs(dtype, seed)`` / ``stack_sample_inputs(dtype, seed)``: yield every case.

Layouts: "contiguous"; "transposed" (a transposed view, last dim has stride != 1); "sliced"
(every other column of a wider tensor); "mixed" (x contiguous, branch_out transposed).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

ACTIVATIONS: tuple[str, ...] = ("relu", "abs", "gelu", "silu", "identity")
LAYOUTS: tuple[str, ...] = ("contiguous", "transposed", "sliced", "mixed")
SCALES: tuple[float, ...] = (0.5, 1.0 / math.sqrt(17.0), 1.0, -0.75, 2.0)


def random_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: torch.Generator,
    layout: str = "contiguous",
    away_from_zero: float = 0.0,
) -> Tensor:
    """A random normal tensor of ``shape`` in the given memory layout; no exact zeros.

    With ``away_from_zero`` > 0 every element has magnitude >= away_from_zero (for gradcheck
    around the kinks of relu and abs).
    """
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator, dtype=torch.float64)
        values = base.transpose(-1, -2)
    elif layout == "sliced":
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=torch.float64)
        values = base[..., 1::2]
    else:
        values = torch.randn(*shape, generator=generator, dtype=torch.float64)
    # never an exact zero (randn practically never gives one; make it impossible)
    values = torch.where(values == 0, torch.full_like(values, 0.5), values)
    if away_from_zero > 0:
        values = torch.sign(values) * (values.abs() + away_from_zero)
    if layout == "transposed" and len(shape) >= 2:
        # cast into a buffer of the base's shape and return the same transposed view of it
        buffer = torch.ones(base.shape, dtype=dtype)
        view = buffer.transpose(-1, -2)
        view.copy_(values)
        return view
    if layout == "sliced":
        buffer = torch.ones(base.shape, dtype=dtype)
        view = buffer[..., 1::2]
        view.copy_(values)
        return view
    return values.to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------
# scaled_residual
# ---------------------------------------------------------------------------------------------------


class ResidualSpec(NamedTuple):
    shape: tuple[int, ...]
    layout: str
    activation: str
    mean_subtract: bool
    scale: float

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{shape}-{self.layout}-{self.activation}-{'ms' if self.mean_subtract else 'noms'}-s{self.scale:.3g}"


@dataclass
class ResidualCase:
    x: Tensor
    branch_out: Tensor
    scale: float
    activation: str
    mean_subtract: bool
    spec: ResidualSpec

    def args(self) -> tuple:
        return (self.x, self.branch_out, self.scale, self.activation, self.mean_subtract)

    def to(self, device: str) -> ResidualCase:
        """The case on ``device``, its tensors fresh leaves that keep their layout and requires_grad."""
        x, branch_out = (t.detach().to(device).requires_grad_(t.requires_grad) for t in (self.x, self.branch_out))
        return dataclasses.replace(self, x=x, branch_out=branch_out)


RESIDUAL_SHAPES: tuple[tuple[int, ...], ...] = (
    (4, 1),  # n = 1
    (3, 2),
    (5, 3),
    (7, 5),
    (1, 48),  # B = 1
    (6, 48),
    (1, 96),
    (9, 96),
    (5, 200),
    (1, 200),
    (2, 3, 48),  # leading batch dims
    (2, 1, 4, 7),
)
"""Small shapes: n in {1, 2, 3, 5, 7, 48, 96, 200}, B = 1 and leading batch dims."""

PARALLEL_SHAPES: tuple[tuple[int, ...], ...] = ((300, 200), (5000, 5))
"""Enough rows that the CPU kernel splits them over several parallel tasks."""


def _residual_specs() -> list[ResidualSpec]:
    specs = []
    combos = list(itertools.product(ACTIVATIONS, (True, False)))
    for i, shape in enumerate(RESIDUAL_SHAPES):
        for j, (activation, mean_subtract) in enumerate(combos):
            layout = LAYOUTS[(i + j) % len(LAYOUTS)]
            specs.append(ResidualSpec(shape, layout, activation, mean_subtract, SCALES[(i + j) % len(SCALES)]))
    for k, shape in enumerate(PARALLEL_SHAPES):
        specs.append(ResidualSpec(shape, LAYOUTS[k], ACTIVATIONS[k], True, SCALES[k]))
    return specs


RESIDUAL_SPECS: list[ResidualSpec] = _residual_specs()

WIDE_RESIDUAL_SPECS: list[ResidualSpec] = [
    ResidualSpec((3, 9000), "contiguous", "gelu", True, 0.5),
    ResidualSpec((2, 8193), "transposed", "abs", True, -0.75),
    ResidualSpec((2, 8192), "contiguous", "relu", True, 1.0),
]
"""Rows around the widest row the Triton epilogue keeps in one tile (8192, docs/design.md §7.8): two passes,
the mean first, beyond it."""


def make_residual_case(
    spec: ResidualSpec, dtype: torch.dtype, seed: int, *, requires_grad: bool = False, away_from_zero: float = 0.0
) -> ResidualCase:
    generator = torch.Generator().manual_seed(seed)
    x_layout = "contiguous" if spec.layout == "mixed" else spec.layout
    b_layout = "transposed" if spec.layout == "mixed" else spec.layout
    x = random_tensor(spec.shape, dtype, generator, x_layout)
    branch_out = random_tensor(spec.shape, dtype, generator, b_layout, away_from_zero=away_from_zero)
    if requires_grad:
        x.requires_grad_(True)
        branch_out.requires_grad_(True)
    return ResidualCase(x, branch_out, spec.scale, spec.activation, spec.mean_subtract, spec)


def sample_inputs(
    dtype: torch.dtype, seed: int, *, requires_grad: bool = False, specs: list[ResidualSpec] | None = None
) -> Iterator[ResidualCase]:
    """Every scaled_residual case (or the given specs), each with its own seed derived from ``seed``."""
    for index, spec in enumerate(RESIDUAL_SPECS if specs is None else specs):
        yield make_residual_case(spec, dtype, seed + 7919 * index, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------------
# residual stacks (ResidualStack, DepthMuPNet, functional residual_stack)
# ---------------------------------------------------------------------------------------------------


class StackSpec(NamedTuple):
    width: int
    depth: int
    batch_shape: tuple[int, ...]
    block: str
    bias: bool
    activation: str
    mean_subtract: bool
    layout: str

    @property
    def id(self) -> str:
        batch = "x".join(map(str, self.batch_shape))
        return (
            f"n{self.width}-L{self.depth}-B{batch}-{self.block}-{'bias' if self.bias else 'nobias'}-"
            f"{self.activation}-{'ms' if self.mean_subtract else 'noms'}-{self.layout}"
        )


STACK_DEPTHS: tuple[int, ...] = (1, 2, 17, 256)
# widths per depth: L = 256 stays narrow so the suite stays fast
_STACK_WIDTHS: dict[int, tuple[int, ...]] = {1: (48, 200), 2: (1, 96), 17: (48, 5), 256: (7, 5)}
_BATCHES: tuple[tuple[int, ...], ...] = ((1,), (6,), (2, 3), (5,))


def _stack_specs() -> list[StackSpec]:
    specs = []
    combos = list(itertools.product(ACTIVATIONS, (True, False)))
    index = 0
    for depth in STACK_DEPTHS:
        for block, bias in itertools.product(("post", "pre"), (False, True)):
            width = _STACK_WIDTHS[depth][index % 2]
            activation, mean_subtract = combos[index % len(combos)]
            batch = _BATCHES[index % len(_BATCHES)]
            layout = ("contiguous", "transposed", "sliced")[index % 3]
            if len(batch) != 1 and layout == "transposed":
                layout = "sliced"
            specs.append(StackSpec(width, depth, batch, block, bias, activation, mean_subtract, layout))
            index += 1
    return specs


STACK_SPECS: list[StackSpec] = _stack_specs()


@dataclass
class StackCase:
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    spec: StackSpec

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.spec.depth)

    def to(self, device: str) -> StackCase:
        """The case on ``device`` (layouts kept)."""
        bias = None if self.bias is None else self.bias.to(device)
        return dataclasses.replace(self, x=self.x.to(device), weight=self.weight.to(device), bias=bias)


def make_stack_case(spec: StackSpec, dtype: torch.dtype, seed: int, *, in_features: int | None = None) -> StackCase:
    """x of shape (*batch, width) (or (*batch, in_features)); weight (L, n, n) with std 1/sqrt(n); bias (L, n)."""
    generator = torch.Generator().manual_seed(seed)
    features = spec.width if in_features is None else in_features
    x = random_tensor((*spec.batch_shape, features), dtype, generator, spec.layout)
    weight = (random_tensor((spec.depth, spec.width, spec.width), torch.float64, generator) / math.sqrt(spec.width)).to(
        dtype
    )
    bias = 0.1 * random_tensor((spec.depth, spec.width), torch.float64, generator) if spec.bias else None
    return StackCase(x, weight, None if bias is None else bias.to(dtype), spec)


def stack_sample_inputs(dtype: torch.dtype, seed: int, *, specs: list[StackSpec] | None = None) -> Iterator[StackCase]:
    """Every stack case (or the given specs), each with its own seed derived from ``seed``."""
    for index, spec in enumerate(STACK_SPECS if specs is None else specs):
        yield make_stack_case(spec, dtype, seed + 7919 * index)


# ---------------------------------------------------------------------------------------------------
# the fused op dmup::residual_stack (functional residual_stack with backend="cpp")
# ---------------------------------------------------------------------------------------------------

OP_STACK_WIDTHS: tuple[int, ...] = (1, 7, 48, 64, 96, 200, 256, 512)
OP_STACK_BATCHES: tuple[int, ...] = (1, 3, 64, 1000)
OP_STACK_DEPTHS: tuple[int, ...] = (1, 2, 17, 300)

# Depth of every (width, batch) pair. Each column (one batch) holds every depth, so every (B, L) pair is
# covered, and every (n, B) pair is; every (n, L) pair too except L = 300 for n >= 256, whose weights
# (300 x n x n, 79M elements at n = 512) would cost seconds per case. Wide layers meet the large batch
# at small depth and L = 300 only small batches, to keep the cost down.
_OP_STACK_DEPTH_TABLE: dict[int, tuple[int, int, int, int]] = {
    #    B = 1, 3, 64, 1000
    1: (17, 2, 1, 300),
    7: (2, 1, 17, 300),
    48: (1, 2, 300, 17),
    64: (2, 1, 300, 17),
    96: (1, 300, 17, 2),
    200: (300, 17, 1, 2),
    256: (2, 17, 17, 1),
    512: (17, 2, 2, 1),
}
OP_STACK_SHAPES: tuple[tuple[int, int, int], ...] = tuple(
    (width, batch, depth)
    for width in OP_STACK_WIDTHS
    for batch, depth in zip(OP_STACK_BATCHES, _OP_STACK_DEPTH_TABLE[width])
)
"""(n, B, L) of the op parity cases: a (nearly) pairwise covering of the width x batch x depth grid."""

OP_STACK_BIG_SHAPES: tuple[tuple[int, int, int], ...] = ((512, 64, 17), (256, 1000, 2), (48, 3, 300))
"""A few larger (n, B, L): the widest layers over several layers, many row tiles, the deepest stack."""

BLOCKS: tuple[str, ...] = ("post", "pre")


def _op_stack_specs() -> list[StackSpec]:
    """Every (activation, block, mean_subtract, bias) combination (40), each with the next shape of
    OP_STACK_SHAPES (all 32 used, the first 8 twice, with other activations); then the big shapes."""
    specs = []
    combos = [
        (activation, block, mean_subtract, bias)
        for bias in (False, True)
        for mean_subtract in (True, False)
        for block in BLOCKS
        for activation in ACTIVATIONS
    ]  # the activation changes fastest, so neighbouring shapes get different activations
    for index, (activation, block, mean_subtract, bias) in enumerate(combos):
        width, batch, depth = OP_STACK_SHAPES[index % len(OP_STACK_SHAPES)]
        specs.append(StackSpec(width, depth, (batch,), block, bias, activation, mean_subtract, "contiguous"))
    big_combos = [("relu", "post", True, False), ("gelu", "pre", False, True), ("abs", "post", False, True)]
    for (width, batch, depth), (activation, block, mean_subtract, bias) in zip(OP_STACK_BIG_SHAPES, big_combos):
        specs.append(StackSpec(width, depth, (batch,), block, bias, activation, mean_subtract, "contiguous"))
    return specs


OP_STACK_SPECS: list[StackSpec] = _op_stack_specs()

OP_STACK_LAYOUT_SPECS: list[StackSpec] = [
    StackSpec(48, 17, (2, 5), "post", True, "relu", True, "contiguous"),
    StackSpec(7, 2, (2, 5), "pre", False, "gelu", False, "transposed"),
    StackSpec(96, 3, (3, 1, 7), "post", False, "abs", False, "sliced"),
    StackSpec(200, 2, (37,), "pre", True, "silu", True, "transposed"),
    StackSpec(64, 5, (4, 25), "post", True, "identity", True, "sliced"),
]
"""Leading batch dims and non-contiguous x (a transposed view; every other column of a wider tensor)."""


# ---------------------------------------------------------------------------------------------------
# small stacks: every combination on widths either side of the Triton tile sizes (all backends)
# ---------------------------------------------------------------------------------------------------

SMALL_STACK_WIDTHS: tuple[int, ...] = (1, 7, 32, 48, 64, 128)
SMALL_STACK_BATCHES: tuple[int, ...] = (1, 5, 64)
_SMALL_DEPTH_TABLE: dict[int, tuple[int, int, int]] = {
    #    B = 1, 5, 64
    1: (1, 3, 9),
    7: (3, 9, 1),
    32: (9, 1, 3),
    48: (1, 3, 9),
    64: (3, 9, 1),
    128: (9, 1, 3),
}
SMALL_STACK_SHAPES: tuple[tuple[int, int, int], ...] = tuple(
    (width, batch, depth)
    for width in SMALL_STACK_WIDTHS
    for batch, depth in zip(SMALL_STACK_BATCHES, _SMALL_DEPTH_TABLE[width])
)
"""(n, B, L) covering every (n, B), (n, L) and (B, L) pair of n in {1, 7, 32, 48, 64, 128}, B in {1, 5, 64},
L in {1, 3, 9}."""


def _small_stack_specs() -> list[StackSpec]:
    """Every (activation, block, mean_subtract, bias) combination on the next shape of SMALL_STACK_SHAPES."""
    combos = [
        (activation, block, mean_subtract, bias)
        for bias in (False, True)
        for mean_subtract in (True, False)
        for block in BLOCKS
        for activation in ACTIVATIONS
    ]
    return [
        StackSpec(width, depth, (batch,), block, bias, activation, mean_subtract, "contiguous")
        for index, (activation, block, mean_subtract, bias) in enumerate(combos)
        for width, batch, depth in [SMALL_STACK_SHAPES[index % len(SMALL_STACK_SHAPES)]]
    ]


SMALL_STACK_SPECS: list[StackSpec] = _small_stack_specs()

TRITON_WIDE_STACK_SPECS: list[StackSpec] = [
    StackSpec(300, 3, (37,), "post", True, "relu", True, "contiguous"),
    StackSpec(300, 2, (5,), "pre", False, "gelu", True, "sliced"),
    StackSpec(1100, 2, (3,), "post", True, "abs", True, "contiguous"),
    StackSpec(1100, 2, (2, 2), "pre", False, "silu", False, "contiguous"),
]
"""The wide routes of the Triton stack (docs/design.md §7.8): one launch per layer (n = 300, 37 rows: not a
multiple of the row tile) and the library GEMM with the epilogue kernel (n = 1100)."""


# ---------------------------------------------------------------------------------------------------
# MLP stacks (ResidualMLPStack, functional residual_mlp_stack)
# ---------------------------------------------------------------------------------------------------


class MlpStackSpec(NamedTuple):
    width: int
    hidden_width: int
    depth: int
    batch_shape: tuple[int, ...]
    bias: bool
    activation: str
    mean_subtract: bool
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        batch = "x".join(map(str, self.batch_shape))
        return (
            f"n{self.width}-m{self.hidden_width}-L{self.depth}-B{batch}-{'bias' if self.bias else 'nobias'}-"
            f"{self.activation}-{'ms' if self.mean_subtract else 'noms'}-{self.layout}"
        )


MLP_STACK_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    # (n, m, B, L): every n twice, every m twice, every B and every L three times
    (1, 5, 64, 17),
    (1, 300, 3, 2),
    (7, 64, 1, 300),
    (7, 1, 1000, 17),
    (32, 128, 1000, 2),
    (32, 256, 3, 17),
    (64, 256, 64, 2),
    (64, 5, 3, 300),
    (96, 300, 1, 300),
    (96, 64, 64, 1),
    (200, 1, 1, 1),
    (200, 128, 1000, 1),
)
"""(n, m, B, L) of the MLP parity cases, n in {1, 7, 32, 64, 96, 200}, m in {1, 5, 64, 128, 256, 300}, B in
{1, 3, 64, 1000}, L in {1, 2, 17, 300}: every width and hidden width twice and every batch and depth three
times, not a cross product; the deepest stacks have few rows or narrow layers, to keep the cost down."""

MLP_STACK_BIG_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (32, 128, 256, 64),
    (200, 300, 300, 5),
    (64, 256, 3, 300),
)
"""A few larger (n, m, B, L): several row tiles per thread, the widest layers over many rows, a deep stack
of wide hidden layers."""


def _mlp_stack_specs() -> list[MlpStackSpec]:
    """Every (activation, mean_subtract, bias) combination (20), each with the next shape of MLP_STACK_SHAPES
    (all 12 used, the first 8 twice, with other activations); then the big shapes."""
    combos = [
        (activation, mean_subtract, bias)
        for bias in (False, True)
        for mean_subtract in (False, True)
        for activation in ACTIVATIONS
    ]  # the activation changes fastest, so neighbouring shapes get different activations
    specs = [
        MlpStackSpec(width, hidden, depth, (batch,), bias, activation, mean_subtract)
        for index, (activation, mean_subtract, bias) in enumerate(combos)
        for width, hidden, batch, depth in [MLP_STACK_SHAPES[index % len(MLP_STACK_SHAPES)]]
    ]
    big_combos = [("relu", False, False), ("gelu", True, True), ("abs", False, True)]
    for (width, hidden, batch, depth), (activation, mean_subtract, bias) in zip(MLP_STACK_BIG_SHAPES, big_combos):
        specs.append(MlpStackSpec(width, hidden, depth, (batch,), bias, activation, mean_subtract))
    return specs


MLP_STACK_SPECS: list[MlpStackSpec] = _mlp_stack_specs()

TRITON_MLP_STACK_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    # (n, m, B, L): n in {1, 7, 32}, m in {1, 5, 64, 300}, B in {1, 37, 300}, L in {1, 3}, each several times
    (1, 5, 37, 3),
    (1, 300, 1, 1),
    (7, 1, 300, 3),
    (7, 64, 37, 1),
    (32, 300, 37, 3),
    (32, 1, 1, 3),
    (7, 300, 37, 1),
    (32, 64, 300, 3),
    (1, 64, 300, 1),
    (7, 5, 1, 3),
)
"""(n, m, B, L) of the depth-fused Triton MLP stack's parity cases (docs/design.md §3.9): odd widths and hidden
widths (m = 300 takes several hidden chunks and a partial one, m = 1 and 5 one partial chunk and sign byte),
rows that are one, and not, a multiple of the row tile."""

TRITON_MLP_STACK_SPECS: list[MlpStackSpec] = [
    MlpStackSpec(width, hidden, depth, (batch,), bias, activation, mean_subtract)
    for index, (activation, mean_subtract, bias) in enumerate(
        itertools.product(ACTIVATIONS, (False, True), (False, True))
    )
    for width, hidden, batch, depth in [TRITON_MLP_STACK_SHAPES[index % len(TRITON_MLP_STACK_SHAPES)]]
]
"""Every (activation, mean_subtract, bias) combination (20), each with the next shape of TRITON_MLP_STACK_SHAPES
(all 10 twice)."""

MLP_STACK_LAYOUT_SPECS: list[MlpStackSpec] = [
    MlpStackSpec(32, 64, 5, (2, 5), True, "relu", True, "contiguous"),
    MlpStackSpec(7, 5, 2, (2, 5), False, "gelu", False, "transposed"),
    MlpStackSpec(96, 128, 3, (3, 1, 7), True, "abs", False, "sliced"),
    MlpStackSpec(64, 300, 2, (37,), True, "silu", True, "transposed"),
]
"""Leading batch dims and non-contiguous x."""


@dataclass
class MlpStackCase:
    x: Tensor
    weight1: Tensor
    weight2: Tensor
    bias1: Tensor | None
    bias2: Tensor | None
    spec: MlpStackSpec

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.spec.depth)

    @property
    def params(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(weight1, weight2, bias1, bias2), the order of residual_mlp_stack's arguments."""
        return self.weight1, self.weight2, self.bias1, self.bias2

    def to(self, device: str) -> MlpStackCase:
        """The case on ``device`` (layouts kept)."""
        moved = [None if t is None else t.to(device) for t in (self.x, *self.params)]
        return dataclasses.replace(self, **dict(zip(("x", "weight1", "weight2", "bias1", "bias2"), moved)))


def make_mlp_stack_case(spec: MlpStackSpec, dtype: torch.dtype, seed: int) -> MlpStackCase:
    """x of shape (*batch, n); weight1 (L, m, n) with std 1/sqrt(n), weight2 (L, n, m) with std 1/sqrt(m) (muP);
    bias1 (L, m) and bias2 (L, n) small and non-zero."""
    generator = torch.Generator().manual_seed(seed)
    n, m, depth = spec.width, spec.hidden_width, spec.depth
    x = random_tensor((*spec.batch_shape, n), dtype, generator, spec.layout)
    weight1 = (random_tensor((depth, m, n), torch.float64, generator) / math.sqrt(n)).to(dtype)
    weight2 = (random_tensor((depth, n, m), torch.float64, generator) / math.sqrt(m)).to(dtype)
    biases = [(0.1 * random_tensor((depth, k), torch.float64, generator)).to(dtype) for k in (m, n)]
    return MlpStackCase(x, weight1, weight2, *(biases if spec.bias else (None, None)), spec)
