"""residual_stack: L residual blocks of one form applied in sequence (SPEC 2.2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._checks import (
    check_activation,
    check_block,
    check_flag,
    check_like,
    check_scale,
    check_shape,
    check_tensor,
    check_width,
)
from ._backend import resolve_backend
from .scaled_residual import scaled_residual


def check_stack_args(
    x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, activation: str, block: str, mean_subtract: bool
) -> float:
    """Validates the arguments of residual_stack; returns the scale as a float."""
    check_tensor(weight, "weight")
    if weight.dim() != 3 or weight.shape[0] < 1 or weight.shape[1] != weight.shape[2]:
        raise ValueError(f"weight must have shape (depth, width, width) with depth >= 1; got {tuple(weight.shape)}")
    check_tensor(x, "x")
    check_width(x, "x", weight.shape[-1])
    check_like(weight, "weight", x, "x")
    if bias is not None:
        check_tensor(bias, "bias")
        check_shape(bias, "bias", weight.shape[:2])
        check_like(bias, "bias", x, "x")
    check_activation(activation)
    check_block(block)
    check_flag(mean_subtract, "mean_subtract")
    return check_scale(scale)


def residual_stack(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    block: str = "post",
    mean_subtract: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Applies ``weight.shape[0]`` residual blocks to ``x`` of shape (..., n).

    block "post": x <- x + scale * MS(phi(x @ W_l^T + b_l))
    block "pre":  x <- x + scale * MS(phi(x) @ W_l^T + b_l)
    MS (mean subtraction over the width) only when ``mean_subtract``.

    Args:
        weight: (L, n, n), ``nn.Linear`` layout per layer. bias: (L, n) or None.
        backend: "auto", "reference" or "cpp".
    """
    scale = check_stack_args(x, weight, bias, scale, activation, block, mean_subtract)
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.residual_stack(
            x, weight, bias, scale=scale, activation=activation, block=block, mean_subtract=mean_subtract
        )
    for index in range(weight.shape[0]):
        layer_bias = None if bias is None else bias[index]
        if block == "post":
            h = F.linear(x, weight[index], layer_bias)
            x = scaled_residual(x, h, scale, activation, mean_subtract, backend=backend)
        else:
            h = F.linear(reference.activation(x, activation), weight[index], layer_bias)
            x = scaled_residual(x, h, scale, "identity", mean_subtract, backend=backend)
    return x
