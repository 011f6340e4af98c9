"""The contract between residual_stack and its backends, and what the fused stacks save for the
derivative of phi (docs/design.md §3.7, §4). It sits below dmup_kernels.ops and dmup_kernels.triton,
which both import it.

One vocabulary for every backend: ``states`` are the residual-stream states x^0..x^L (or the part of
them a kernel keeps), ``signs`` the saved sign bits of h, ``sign_planes`` their planes per element.
The C++ ops' schemas call the same tensors ``saved`` and ``mask``, and csrc the count ``mask_planes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

SIGN_WORD_BITS = 16
"""Rows per word of the C++ ops' sign bits: they are int16, bit r % 16 of word r // 16 is row r."""


def sign_words(batch: int) -> int:
    """Words per feature and plane of the C++ ops' sign bits for ``batch`` rows: ceil(batch / 16)."""
    return (batch + SIGN_WORD_BITS - 1) // SIGN_WORD_BITS


def sign_planes(activation: str, block: str) -> int:
    """Sign-bit planes saved per element of a "post" block: relu keeps [not h <= 0] (torch's relu
    gradient passes where h is NaN), abs keeps [h > 0] and [h < 0]; the "pre" block and the smooth
    activations keep none."""
    return {"relu": 1, "abs": 2}.get(activation, 0) if block == "post" else 0


class StackSettings(NamedTuple):
    """The non-tensor arguments of the residual_stack ops, in their schemas' order."""

    scale: float
    activation: str
    block: str
    mean_subtract: bool


class StackBackend(Protocol):
    """One backend of residual_stack. Its backward is the autograd rule of the op ``forward`` calls
    (or eager autograd for the reference), so the contract is the forward and what it leaves behind."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, Any]:
        """The output for ``x`` of shape (..., n) in x's dtype, and the backend's state. ``save``: keep
        what the backward and ``states`` need (otherwise neither may be used)."""
        ...

    def states(self, state: Any, x: Tensor, out: Tensor) -> Tensor:
        """The states x^0..x^L of the forward that returned ``state`` and ``out``, shape (L + 1, ...,
        n), x's dtype, detached."""
        ...


def compute_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The kernels' operands: x as rows (B, n), all in float32 or float64 (half types run with a float32
    residual stream)."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return x.reshape(-1, x.shape[-1]).to(compute), weight.to(compute), None if bias is None else bias.to(compute)


def stacked_states(states: Sequence[Tensor], x: Tensor) -> Tensor:
    """``states`` (each of x's shape, or rows (B, n)) stacked into shape (L + 1, ..., n), x's dtype, detached."""
    return torch.stack([state.detach().to(x.dtype).reshape(x.shape) for state in states])
