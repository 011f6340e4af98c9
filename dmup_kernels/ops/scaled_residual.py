"""scaled_residual: out = x + scale * MS(phi(branch_out)), the epilogue of every residual block.

The op ``dmup::scaled_residual`` is defined in csrc/ops.cpp with a kernel per device; this file adds
its fake (shape) rule and its autograd rule, and the public function that validates arguments and
picks a backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import check_activation, check_flag, check_like, check_scale, check_shape, check_tensor
from .._extension import HAS_CPP
from ._autograd import register_autograd
from ._backend import resolve_backend


def scaled_residual(
    x: Tensor,
    branch_out: Tensor,
    scale: float,
    activation: str = "identity",
    mean_subtract: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """``x + scale * MS(phi(branch_out))``, fused into one pass over memory.

    Args:
        x: residual stream, shape (..., n).
        branch_out: output of the residual branch, same shape, dtype and device as ``x``.
        scale: branch multiplier s (for Depth-muP, ``a / sqrt(L)``).
        activation: phi, one of "relu", "abs", "gelu" (tanh form), "silu", "identity".
        mean_subtract: subtract the mean over the last dim after phi (MS).
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
    """
    check_tensor(x, "x")
    check_tensor(branch_out, "branch_out")
    check_like(branch_out, "branch_out", x, "x", autocast=True)
    check_shape(branch_out, "branch_out", x.shape)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., n); got a 0-dim tensor")
    scale = check_scale(scale)
    check_activation(activation)
    check_flag(mean_subtract, "mean_subtract")
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.scaled_residual(x, branch_out, scale, activation, mean_subtract)
    if x.dtype != branch_out.dtype:  # under autocast: compute in the wider dtype, as eager's x + s * v does
        common = torch.promote_types(x.dtype, branch_out.dtype)
        x, branch_out = x.to(common), branch_out.to(common)
    if backend == "triton":
        return torch.ops.dmup.triton_scaled_residual(x, branch_out, scale, activation, mean_subtract)
    return torch.ops.dmup.scaled_residual(x, branch_out, scale, activation, mean_subtract)


def register_epilogue_rules(op: str, backward_op: str) -> None:
    """The fake (shape) and autograd rules of an epilogue op ``op`` (x, branch_out, scale, activation,
    mean_subtract) -> out, whose gradient with respect to branch_out the op ``backward_op`` (grad_out,
    branch_out, scale, activation, mean_subtract) computes; the gradient with respect to x is grad_out."""

    def fake(x: Tensor, branch_out: Tensor, *settings) -> Tensor:
        torch._check(x.shape == branch_out.shape, lambda: "branch_out must have the shape of x")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    torch.library.register_fake(op)(fake)
    torch.library.register_fake(backward_op)(fake)
    compute_backward = getattr(torch.ops.dmup, backward_op.removeprefix("dmup::"))

    def setup_context(ctx, inputs, output) -> None:
        _, branch_out, *ctx.settings = inputs
        ctx.save_for_backward(branch_out)

    def backward(ctx, grad_out: Tensor):
        (branch_out,) = ctx.saved_tensors
        return grad_out, compute_backward(grad_out, branch_out, *ctx.settings), None, None, None

    register_autograd(op, backward, setup_context=setup_context, backward_op=backward_op)


if HAS_CPP:
    register_epilogue_rules("dmup::scaled_residual", "dmup::scaled_residual_backward")
