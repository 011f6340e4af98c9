"""The Triton kernels as torch ops: ``torch.library.triton_op`` + ``wrap_triton``, so that torch.compile
traces into the kernels, with their autograd rules.

    dmup::triton_scaled_residual(x, branch_out, scale, activation, mean_subtract) -> out
    dmup::triton_residual_stack(x, weight, bias?, scale, activation, block, mean_subtract,
                                save_for_backward) -> (out, states, signs, pre)

They are separate ops from dmup::scaled_residual / dmup::residual_stack because a triton_op owns its
schema; ``TRITON_STACK`` is the backend that dmup_kernels.ops.residual_stack dispatches to, and it
chooses between the fused kernels and a GEMM per layer. The autograd rules go through
``dmup_kernels._registration`` like the C++ ops', so torch.func transforms work. The fake (shape)
rules are explicit because under the Triton interpreter the kernels would otherwise run on fake tensors.
Under the interpreter the kernels are Python that reads tensor data, which cannot be traced, so there
the ops are plain custom ops, opaque to torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from .. import reference
from .._layout import StackSettings, compute_rows, stacked_states
from .._registration import register_autograd, register_epilogue_rules
from . import INTERPRETED
from .residual_stack import (
    allocate_stack_gradients,
    allocate_stack_outputs,
    fills_the_gpu,
    sm_count,
    stack_backward,
    stack_forward,
    uses_fused_kernels,
)
from .scaled_residual import scaled_residual_backward, scaled_residual_forward

_define_op = custom_op if INTERPRETED else triton_op


# The launchers' own signatures are the schemas.
_define_op("dmup::triton_scaled_residual", mutates_args=())(scaled_residual_forward)
_define_op("dmup::triton_scaled_residual_backward", mutates_args=())(scaled_residual_backward)
triton_residual_stack = _define_op("dmup::triton_residual_stack", mutates_args=())(stack_forward)
triton_residual_stack_backward = _define_op("dmup::triton_residual_stack_backward", mutates_args=())(stack_backward)

register_epilogue_rules("dmup::triton_scaled_residual", "dmup::triton_scaled_residual_backward")


@triton_residual_stack.register_fake
def _(x, weight, bias, scale, activation, block, mean_subtract, save_for_backward):
    return allocate_stack_outputs(x, weight.shape[0], activation, block, save_for_backward)


@triton_residual_stack_backward.register_fake
def _(grad_out, x, states, signs, pre, weight, bias, scale, activation, block, mean_subtract):
    return allocate_stack_gradients(x, weight, bias)


def _setup_stack(ctx, inputs, output) -> None:
    x, weight, bias, *ctx.settings, ctx.saved_state = inputs
    _, states, signs, pre = output
    ctx.mark_non_differentiable(states, signs, pre)
    ctx.save_for_backward(x, states, signs, pre, weight, bias)


def _backward_stack(ctx, grad_out: Tensor, _grad_states, _grad_signs, _grad_pre):
    if not ctx.saved_state:
        raise RuntimeError(
            "dmup::triton_residual_stack ran with save_for_backward=False, so it cannot be differentiated"
        )
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


class TritonStack:
    """The Triton backend of residual_stack. Its state is the inner states x^1..x^{L-1} as rows (B, n):
    the fused op's ``states`` tensor, or the per-layer path's list."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, Tensor | list[Tensor]]:
        rows, weight, bias = compute_rows(x, weight, bias)
        width, itemsize = rows.shape[1], rows.element_size()
        if uses_fused_kernels(width, itemsize) and fills_the_gpu(rows.shape[0], width, itemsize, sm_count(x.device)):
            out, states, _, _ = torch.ops.dmup.triton_residual_stack(rows, weight, bias, *settings, save)
        else:
            # Rows too wide for one register tile, or too few of them to occupy the GPU: a library GEMM
            # per layer, then the Triton epilogue kernel.
            stream = reference.residual_stream(
                rows, weight, bias, **settings._asdict(), epilogue=torch.ops.dmup.triton_scaled_residual
            )
            out, states = stream[-1], stream[1:-1]
        return out.to(x.dtype).reshape(x.shape), states

    def states(self, state: Tensor | list[Tensor], x: Tensor, out: Tensor) -> Tensor:
        return stacked_states([x, *state, out], x)


TRITON_STACK = TritonStack()
