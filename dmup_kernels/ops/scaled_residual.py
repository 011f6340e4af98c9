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
from .._registration import register_epilogue_rules
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


if HAS_CPP:
    register_epilogue_rules("dmup::scaled_residual", "dmup::scaled_residual_backward")
