"""Drop-in ``torch.nn`` modules for Depth-muP residual networks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import (
    check_activation,
    check_block,
    check_choice,
    check_flag,
    check_float_dtype,
    check_like,
    check_positive_int,
    check_scale,
    check_tensor,
    check_width,
)
from .ops import BACKENDS, residual_stack, scaled_residual
from .parametrization import DEPTH_MUP, DepthParametrization


class ScaledResidual(nn.Module):
    """``x + scale * MS(phi(branch(x)))`` around any branch module (SPEC 2.2, generic branch).

    Args:
        branch: the residual branch f; must map (..., n) to (..., n).
        scale: branch multiplier s, e.g. ``DEPTH_MUP.branch_scale(L)``.
        activation: phi applied to the branch output ("identity" for none).
        mean_subtract: subtract the mean over the width after phi.
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
    """

    def __init__(
        self,
        branch: nn.Module,
        scale: float,
        activation: str = "identity",
        mean_subtract: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module; got {type(branch).__name__}")
        self.branch = branch
        self.scale = check_scale(scale)
        self.activation = check_activation(activation)
        self.mean_subtract = check_flag(mean_subtract, "mean_subtract")
        self.backend = check_choice(backend, "backend", BACKENDS)

    def reset_parameters(self) -> None:
        """Re-initialises every submodule of the branch that has ``reset_parameters``."""
        for module in self.branch.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_tensor(x, "x")  # before the branch, so a bad x is named here rather than deep inside it
        return scaled_residual(x, self.branch(x), self.scale, self.activation, self.mean_subtract, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale:.6g}, activation={self.activation!r}, mean_subtract={self.mean_subtract}, "
            f"backend={self.backend!r}"
        )


class ResidualStack(nn.Module):
    """``depth`` residual blocks of width ``width`` with one (depth, width, width) weight.

    block "post" (default, the paper's form): x <- x + s * MS(phi(x @ W_l^T + b_l))
    block "pre":                               x <- x + s * MS(phi(x) @ W_l^T + b_l)
    with s = ``parametrization.branch_scale(depth)`` and MS only when ``mean_subtract``.
    Hidden weights are initialised with variance 1/width (muP), biases with zeros.

    Args:
        width: n, the residual-stream width. depth: L, the number of blocks.
        activation: phi. block: "post" or "pre". mean_subtract: MS on the branch output.
        bias: add a learnable bias of shape (depth, width).
        parametrization: the depth scaling rule (DEPTH_MUP by default).
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
    Input: (..., width). Output: same shape.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        *,
        activation: str = "relu",
        block: str = "post",
        mean_subtract: bool = True,
        bias: bool = False,
        parametrization: DepthParametrization = DEPTH_MUP,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.width = check_positive_int(width, "width")
        self.depth = check_positive_int(depth, "depth")
        self.activation = check_activation(activation)
        self.block = check_block(block)
        self.mean_subtract = check_flag(mean_subtract, "mean_subtract")
        if not isinstance(parametrization, DepthParametrization):
            raise TypeError(f"parametrization must be a DepthParametrization; got {type(parametrization).__name__}")
        self.parametrization = parametrization
        self.backend = check_choice(backend, "backend", BACKENDS)
        check_float_dtype(dtype, "dtype")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(depth, width, width, **factory))
        self.bias = nn.Parameter(torch.empty(depth, width, **factory)) if check_flag(bias, "bias") else None
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """The branch multiplier s = parametrization.branch_scale(depth)."""
        return self.parametrization.branch_scale(self.depth)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.width))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, return_states: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The stack's output; with ``return_states`` also the states x^0..x^L as a detached tensor of
        shape (depth + 1, ..., width)."""
        check_width(x, "x", self.width)
        check_like(x, "x", self.weight, "weight")
        return residual_stack(
            x,
            self.weight,
            self.bias,
            scale=self.scale,
            activation=self.activation,
            block=self.block,
            mean_subtract=self.mean_subtract,
            backend=self.backend,
            return_states=return_states,
        )

    def extra_repr(self) -> str:
        p = self.parametrization
        return (
            f"width={self.width}, depth={self.depth}, activation={self.activation!r}, block={self.block!r}, "
            f"mean_subtract={self.mean_subtract}, bias={self.bias is not None}, scale={self.scale:.6g}, "
            f"parametrization=(alpha={p.alpha}, gamma={p.gamma}, multiplier={p.multiplier}, "
            f"base_depth={p.base_depth}), backend={self.backend!r}"
        )


class DepthMuPNet(nn.Module):
    """input ``nn.Linear`` -> ``ResidualStack`` -> output ``nn.Linear``, initialised as muP prescribes.

    Input layer weights have variance 1/in_features, output layer weights 1/width^2 (or zeros with
    ``readout_zero_init``); their biases start at zero. Only the stack's parameters get the
    depth-scaled learning rate (see ``dmup_kernels.optim.param_groups``).

    Args:
        in_features, width, depth, out_features: the sizes.
        readout_zero_init: initialise the output layer to zero.
        **stack_kwargs: passed to ``ResidualStack`` (activation, block, parametrization, backend, ...).
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        *,
        readout_zero_init: bool = False,
        **stack_kwargs: Any,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(width, "width")
        check_positive_int(out_features, "out_features")
        self.readout_zero_init = check_flag(readout_zero_init, "readout_zero_init")
        factory = {key: stack_kwargs[key] for key in ("device", "dtype") if key in stack_kwargs}
        self.input = nn.Linear(in_features, width, **factory)
        self.stack = ResidualStack(width, depth, **stack_kwargs)
        self.output = nn.Linear(width, out_features, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.input.weight, std=1.0 / math.sqrt(self.input.in_features))
        nn.init.zeros_(self.input.bias)
        self.stack.reset_parameters()
        if self.readout_zero_init:
            nn.init.zeros_(self.output.weight)
        else:
            nn.init.normal_(self.output.weight, std=1.0 / self.stack.width)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_width(x, "x", self.input.in_features, "in_features")
        check_like(x, "x", self.input.weight, "input.weight")
        return self.output(self.stack(self.input(x)))

    def extra_repr(self) -> str:
        return f"readout_zero_init={self.readout_zero_init}"
