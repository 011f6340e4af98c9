"""The Triton kernels as torch ops: ``torch.library.triton_op`` + ``wrap_triton``, so that torch.compile
traces into the kernels, with their autograd rules.

    dmup::triton_scaled_residual(x, branch_out, scale, activation, mean_subtract) -> out
    dmup::triton_residual_stack(x, weight, bias?, scale, activation, block, mean_subtract,
                                save_for_backward) -> (out, states, signs, pre)

They are separate ops from dmup::scaled_residual / dmup::residual_stack because a triton_op owns its
schema; the functional ops in dmup_kernels.ops choose between them by backend. The autograd rules
go through ``dmup_kernels.ops._autograd`` like the C++ ops', so torch.func transforms work. The fake (shape)
rules are explicit because under the Triton interpreter the kernels would otherwise run on fake tensors.
Under the interpreter the kernels are Python that reads tensor data, which cannot be traced, so there
the ops are plain custom ops, opaque to torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from ..ops._autograd import register_autograd
from . import INTERPRETED
from .residual_stack import saves_pre_activation, sign_planes, stack_backward, stack_forward
from .scaled_residual import scaled_residual_backward, scaled_residual_forward

_define_op = custom_op if INTERPRETED else triton_op


@_define_op("dmup::triton_scaled_residual", mutates_args=())
def triton_scaled_residual(x: Tensor, branch_out: Tensor, scale: float, activation: str, mean_subtract: bool) -> Tensor:
    return scaled_residual_forward(x, branch_out, scale, activation, mean_subtract)


@_define_op("dmup::triton_scaled_residual_backward", mutates_args=())
def triton_scaled_residual_backward(
    grad_out: Tensor, branch_out: Tensor, scale: float, activation: str, mean_subtract: bool
) -> Tensor:
    return scaled_residual_backward(grad_out, branch_out, scale, activation, mean_subtract)


@triton_scaled_residual.register_fake
def _(x: Tensor, branch_out: Tensor, scale: float, activation: str, mean_subtract: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@triton_scaled_residual_backward.register_fake
def _(grad_out: Tensor, branch_out: Tensor, scale: float, activation: str, mean_subtract: bool) -> Tensor:
    return torch.empty_like(grad_out, memory_format=torch.contiguous_format)


def _setup_scaled_residual(ctx, inputs, output) -> None:
    _, branch_out, ctx.scale, ctx.activation, ctx.mean_subtract = inputs
    ctx.save_for_backward(branch_out)


def _backward_scaled_residual(ctx, grad_out: Tensor):
    (branch_out,) = ctx.saved_tensors
    grad_branch = triton_scaled_residual_backward(grad_out, branch_out, ctx.scale, ctx.activation, ctx.mean_subtract)
    return grad_out, grad_branch, None, None, None


register_autograd(
    "dmup::triton_scaled_residual",
    _backward_scaled_residual,
    setup_context=_setup_scaled_residual,
    backward_op="dmup::triton_scaled_residual_backward",
)


@_define_op("dmup::triton_residual_stack", mutates_args=())
def triton_residual_stack(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: float,
    activation: str,
    block: str,
    mean_subtract: bool,
    save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return stack_forward(x, weight, bias, scale, activation, block, mean_subtract, save_for_backward)


@_define_op("dmup::triton_residual_stack_backward", mutates_args=())
def triton_residual_stack_backward(
    grad_out: Tensor,
    x: Tensor,
    states: Tensor,
    signs: Tensor,
    pre: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: float,
    activation: str,
    block: str,
    mean_subtract: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return stack_backward(grad_out, x, states, signs, pre, weight, bias, scale, activation, block, mean_subtract)


@triton_residual_stack.register_fake
def _(x, weight, bias, scale, activation, block, mean_subtract, save_for_backward):
    rows, n = x.shape
    kept = weight.shape[0] if save_for_backward else 0
    return (
        torch.empty_like(x),
        x.new_empty(max(kept - 1, 0), rows, n),
        x.new_empty(kept, sign_planes(activation, block), rows, (n + 7) // 8, dtype=torch.uint8),
        x.new_empty(kept if saves_pre_activation(activation, block) else 0, rows, n),
    )


@triton_residual_stack_backward.register_fake
def _(grad_out, x, states, signs, pre, weight, bias, scale, activation, block, mean_subtract):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(0 if bias is None else weight.shape[0], weight.shape[1])


def _setup_stack(ctx, inputs, output) -> None:
    x, weight, bias, *ctx.settings, ctx.saved_state = inputs
    _, states, signs, pre = output
    ctx.mark_non_differentiable(states, signs, pre)
    ctx.save_for_backward(x, states, signs, pre, weight, bias)


def _backward_stack(ctx, grad_out: Tensor, _grad_states, _grad_signs, _grad_pre):
    if not ctx.saved_state:
        raise RuntimeError("dmup::triton_residual_stack ran with save_for_backward=False, so it cannot be differentiated")
    x, states, signs, pre, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = triton_residual_stack_backward(
        grad_out, x, states, signs, pre, weight, bias, *ctx.settings
    )
    return grad_x, grad_weight, None if bias is None else grad_bias, None, None, None, None, None


register_autograd(
    "dmup::triton_residual_stack",
    _backward_stack,
    setup_context=_setup_stack,
    backward_op="dmup::triton_residual_stack_backward",
)
