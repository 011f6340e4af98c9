"""scaled_residual: out = x + scale * MS(phi(branch_out)), the epilogue of every residual block.

The op ``dmup::scaled_residual`` is defined in csrc/ops.cpp with a kernel per device; ``CPP_EPILOGUE``
registers its fake (shape) and autograd rules. This file holds the backends and the public function,
which validates the arguments and dispatches to one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import check_activation, check_flag, check_like, check_scale, check_shape, check_tensor
from .._extension import HAS_CPP
from .._layout import EpilogueBackend, EpilogueSettings
from .._registration import OpEpilogue
from ..triton import HAS_TRITON
from ._backend import resolve_backend

if HAS_TRITON:
    from ..triton.ops import TRITON_EPILOGUE


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
    if backend != "reference" and x.dtype != branch_out.dtype:
        # Under autocast: compute in the wider dtype, as eager's x + s * v does.
        common = torch.promote_types(x.dtype, branch_out.dtype)
        x, branch_out = x.to(common), branch_out.to(common)
    out, _ = EPILOGUE_BACKENDS[backend].forward(x, branch_out, EpilogueSettings(scale, activation, mean_subtract))
    return out


class ReferenceEpilogue:
    """Eager PyTorch, differentiated by autograd; its backward differentiates a recomputation."""

    def forward(self, x: Tensor, branch_out: Tensor, settings: EpilogueSettings) -> tuple[Tensor, Tensor]:
        return reference.scaled_residual(x, branch_out, *settings), branch_out

    def backward(self, grad_out: Tensor, state: Tensor, settings: EpilogueSettings) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            branch_out = state.detach().requires_grad_()
            out = reference.scaled_residual(torch.zeros_like(branch_out), branch_out, *settings)
            (grad_branch_out,) = torch.autograd.grad(out, branch_out, grad_out)
        return grad_out, grad_branch_out


EPILOGUE_BACKENDS: dict[str, EpilogueBackend] = {"reference": ReferenceEpilogue()}
if HAS_CPP:
    CPP_EPILOGUE = OpEpilogue("dmup::scaled_residual", "dmup::scaled_residual_backward")
    EPILOGUE_BACKENDS["cpp"] = EPILOGUE_BACKENDS["cuda"] = CPP_EPILOGUE
if HAS_TRITON:
    EPILOGUE_BACKENDS["triton"] = TRITON_EPILOGUE
