"""residual_stack: L residual blocks of one form applied in sequence (docs/design.md §2.2-§2.4)."""

from __future__ import annotations

import torch
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
from .._extension import HAS_CPP
from .._layout import StackBackend, StackSettings, compute_rows, sign_planes, sign_words, stacked_states
from .._registration import register_autograd
from ..triton import HAS_TRITON
from ._backend import resolve_backend

if HAS_TRITON:
    from ..triton.ops import TRITON_STACK


def check_stack_args(
    x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, activation: str, block: str, mean_subtract: bool
) -> float:
    """Validates the arguments of residual_stack; returns the scale as a float."""
    check_tensor(weight, "weight")
    if weight.dim() != 3 or weight.shape[0] < 1 or weight.shape[1] != weight.shape[2]:
        raise ValueError(f"weight must have shape (depth, width, width) with depth >= 1; got {tuple(weight.shape)}")
    check_width(x, "x", weight.shape[-1])  # also checks that x is a floating-point tensor
    check_like(weight, "weight", x, "x", autocast=True)
    if bias is not None:
        check_tensor(bias, "bias")
        check_shape(bias, "bias", weight.shape[:2])
        check_like(bias, "bias", x, "x", autocast=True)
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
    return_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Applies ``weight.shape[0]`` residual blocks to ``x`` of shape (..., n).

    block "post": x <- x + scale * MS(phi(x @ W_l^T + b_l))
    block "pre":  x <- x + scale * MS(phi(x) @ W_l^T + b_l)
    MS (mean subtraction over the width) only when ``mean_subtract``.

    Args:
        weight: (L, n, n), ``nn.Linear`` layout per layer. bias: (L, n) or None.
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
        return_states: also return the residual-stream states x^0..x^L, stacked into a tensor of shape
            (L + 1, ..., n) and detached from autograd (for diagnostics); the output stays differentiable.
    """
    scale = check_stack_args(x, weight, bias, scale, activation, block, mean_subtract)
    check_flag(return_states, "return_states")
    backend = resolve_backend(backend, x.device)
    stack = REFERENCE_STACK if x.numel() == 0 else STACK_BACKENDS[backend]
    params = (x, weight) if bias is None else (x, weight, bias)
    save = return_states or (torch.is_grad_enabled() and any(t.requires_grad for t in params))
    out, state = stack.forward(x, weight, bias, StackSettings(scale, activation, block, mean_subtract), save)
    return (out, stack.states(state, x, out)) if return_states else out


class ReferenceStack:
    """Eager PyTorch; its state is the list of states, which autograd differentiates through."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, list[Tensor]]:
        states = reference.residual_stream(x, weight, bias, **settings._asdict())
        return states[-1], states

    def states(self, state: list[Tensor], x: Tensor, out: Tensor) -> Tensor:
        return stacked_states(state, x)


class CppStack:
    """The C++ op dmup::residual_stack (CPU and CUDA kernels); its state is (states, signs): x^0..x^{L-1}
    feature-major (L, n, B) and the sign bits (docs/design.md §4)."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, states, signs = torch.ops.dmup.residual_stack(*compute_rows(x, weight, bias), *settings, save)
        return out.to(x.dtype).reshape(x.shape), (states, signs)

    def states(self, state: tuple[Tensor, Tensor], x: Tensor, out: Tensor) -> Tensor:
        states, _ = state
        return stacked_states([*states.transpose(1, 2), out.reshape(-1, x.shape[-1])], x)


REFERENCE_STACK = ReferenceStack()
CPP_STACK = CppStack()
STACK_BACKENDS: dict[str, StackBackend] = {"reference": REFERENCE_STACK, "cpp": CPP_STACK, "cuda": CPP_STACK}
if HAS_TRITON:
    STACK_BACKENDS["triton"] = TRITON_STACK


if HAS_CPP:

    @torch.library.register_fake("dmup::residual_stack")
    def _(x, weight, bias, scale, activation, block, mean_subtract, save_for_backward):
        batch, width = x.shape
        kept = weight.shape[0] if save_for_backward else 0
        signs_shape = (kept, sign_planes(activation, block), width, sign_words(batch))
        return x.new_empty(batch, width), x.new_empty(kept, width, batch), x.new_empty(signs_shape, dtype=torch.int16)

    @torch.library.register_fake("dmup::residual_stack_backward")
    def _(grad_out, states, signs, weight, bias, scale, activation, block, mean_subtract):
        bias_rows = 0 if bias is None else weight.shape[0]
        return (
            grad_out.new_empty(grad_out.shape),
            weight.new_empty(weight.shape),
            weight.new_empty(bias_rows, weight.shape[1]),
        )

    def _setup_context(ctx, inputs, output) -> None:
        _, weight, bias, *ctx.settings, ctx.saved_state = inputs
        _, states, signs = output
        ctx.mark_non_differentiable(states, signs)
        ctx.save_for_backward(states, signs, weight, bias)

    def _backward(ctx, grad_out, _grad_states, _grad_signs):
        if not ctx.saved_state:
            raise RuntimeError("dmup::residual_stack ran with save_for_backward=False, so it cannot be differentiated")
        states, signs, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.dmup.residual_stack_backward(
            grad_out, states, signs, weight, bias, *ctx.settings
        )
        return grad_x, grad_weight, None if bias is None else grad_bias, None, None, None, None, None

    register_autograd(
        "dmup::residual_stack", _backward, setup_context=_setup_context, backward_op="dmup::residual_stack_backward"
    )
