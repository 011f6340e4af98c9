"""Eager reference of every op: plain torch, written for clarity, differentiated by autograd.

This module is the ground truth for every kernel (tests) and the "eager" peer in benchmarks.
Notation (docs/design.md §2.1): ``x`` is the residual stream (..., n); weights follow ``nn.Linear``
(``h = x @ W^T + b``); ``s`` is the branch scale; MS is mean subtraction over the width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "abs": torch.abs,
    "gelu": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
    "identity": lambda h: h,
}
"""phi by name. gelu is the tanh form: h/2 * (1 + tanh(sqrt(2/pi) * (h + 0.044715 h^3)))."""

BLOCKS: tuple[str, ...] = ("post", "pre")


def activation(h: Tensor, name: str) -> Tensor:
    """phi(h) for the activation called ``name``."""
    return ACTIVATIONS[name](h)


def subtract_mean(u: Tensor) -> Tensor:
    """MS(u) = u - mean over the last dim (the width)."""
    return u - u.mean(dim=-1, keepdim=True)


def scaled_residual(
    x: Tensor, branch_out: Tensor, scale: float, activation: str = "identity", mean_subtract: bool = False
) -> Tensor:
    """x + scale * MS(phi(branch_out)); MS only when ``mean_subtract``."""
    v = ACTIVATIONS[activation](branch_out)
    if mean_subtract:
        v = subtract_mean(v)
    return x + scale * v


Epilogue = Callable[[Tensor, Tensor, float, str, bool], Tensor]
"""An implementation of ``scaled_residual``: (x, branch_out, scale, activation, mean_subtract) -> out."""


def post_block(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    mean_subtract: bool = True,
    epilogue: Epilogue = scaled_residual,
) -> Tensor:
    """Post-activation block (paper Sec. 6.3): x + s * MS(phi(x @ W^T + b))."""
    return epilogue(x, F.linear(x, weight, bias), scale, activation, mean_subtract)


def pre_block(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    mean_subtract: bool = False,
    epilogue: Epilogue = scaled_residual,
) -> Tensor:
    """Pre-activation block (Bordelon et al.): x + s * MS(phi(x) @ W^T + b); MS only when asked."""
    return epilogue(x, F.linear(ACTIVATIONS[activation](x), weight, bias), scale, "identity", mean_subtract)


BLOCK_FUNCTIONS: dict[str, Callable[..., Tensor]] = {"post": post_block, "pre": pre_block}
"""The block of each form in ``BLOCKS``, by name."""


def mlp_block(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Tensor | None = None,
    bias2: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    mean_subtract: bool = False,
    epilogue: Epilogue = scaled_residual,
) -> Tensor:
    """MLP block, a branch of two matrices: x + s * MS(phi(x @ W1^T + b1) @ W2^T + b2), W1 of shape (m, n),
    W2 (n, m), b1 (m,), b2 (n,); MS only when ``mean_subtract``."""
    hidden = ACTIVATIONS[activation](F.linear(x, weight1, bias1))
    return epilogue(x, F.linear(hidden, weight2, bias2), scale, "identity", mean_subtract)


def residual_stream(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    block: str = "post",
    mean_subtract: bool = True,
    epilogue: Epilogue = scaled_residual,
) -> list[Tensor]:
    """The states [x^0, ..., x^L] of L blocks in sequence; ``weight`` is (L, n, n), ``bias`` (L, n) or None.

    block "post": x_{l+1} = x_l + s * MS(phi(x_l @ W_l^T + b_l))
    block "pre":  x_{l+1} = x_l + s * MS(phi(x_l) @ W_l^T + b_l)
    (MS only when ``mean_subtract``); ``epilogue`` computes x + s * MS(phi(branch)) (a kernel may stand in).
    """
    options = dict(scale=scale, activation=activation, mean_subtract=mean_subtract, epilogue=epilogue)
    return _stream(x, BLOCK_FUNCTIONS[block], options, weight, bias)


def residual_mlp_stream(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Tensor | None = None,
    bias2: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    mean_subtract: bool = False,
    epilogue: Epilogue = scaled_residual,
) -> list[Tensor]:
    """The states [x^0, ..., x^L] of L MLP blocks in sequence; ``weight1`` is (L, m, n), ``weight2`` (L, n, m),
    ``bias1`` (L, m) and ``bias2`` (L, n) or None:

    x_{l+1} = x_l + s * MS(phi(x_l @ W1_l^T + b1_l) @ W2_l^T + b2_l)      (MS only when ``mean_subtract``)
    """
    options = dict(scale=scale, activation=activation, mean_subtract=mean_subtract, epilogue=epilogue)
    return _stream(x, mlp_block, options, weight1, weight2, bias1, bias2)


def _stream(x: Tensor, block: Callable[..., Tensor], options: dict[str, Any], *params: Tensor | None) -> list[Tensor]:
    """[x^0, ..., x^L] with x^{l+1} = block(x^l, *(param[l] for param in params), **options), a missing
    (None) parameter passed as None to every layer."""
    depth = next(param for param in params if param is not None).shape[0]
    # unbind, not param[l]: the backward of L index ops would write L full-size gradient tensors.
    layers = zip(*([None] * depth if param is None else param.unbind(0) for param in params))
    states = [x]
    for layer in layers:
        states.append(block(states[-1], *layer, **options))
    return states


def residual_stack(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    block: str = "post",
    mean_subtract: bool = True,
) -> Tensor:
    """x^L of ``residual_stream``: L blocks in sequence."""
    return residual_stream(
        x, weight, bias, scale=scale, activation=activation, block=block, mean_subtract=mean_subtract
    )[-1]


def residual_mlp_stack(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Tensor | None = None,
    bias2: Tensor | None = None,
    *,
    scale: float,
    activation: str = "relu",
    mean_subtract: bool = False,
) -> Tensor:
    """x^L of ``residual_mlp_stream``: L MLP blocks in sequence."""
    return residual_mlp_stream(
        x, weight1, weight2, bias1, bias2, scale=scale, activation=activation, mean_subtract=mean_subtract
    )[-1]
