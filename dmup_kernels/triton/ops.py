"""The Triton kernels as torch ops: ``torch.library.triton_op`` + ``wrap_triton``, so that torch.compile
traces into the kernels, with their autograd rules.

    dmup::triton_scaled_residual(x, branch_out, scale, activation, mean_subtract) -> out
    dmup::triton_residual_stack(x, weight, bias?, scale, activation, block, mean_subtract,
                                save_for_backward) -> (out, states, signs, pre)

They are separate ops from dmup::scaled_residual / dmup::residual_stack because a triton_op owns its
schema; ``TRITON_STACK`` is the backend that dmup_kernels.ops.residual_stack dispatches to, and it
chooses between the fused kernels and a GEMM per layer. ``TRITON_MLP_STACK``, the backend of
residual_mlp_stack, runs each MLP block as library GEMMs and the epilogue kernel. The autograd rules go through
``dmup_kernels._registration`` like the C++ ops', so torch.func transforms work. The fake (shape)
rules are explicit because under the Triton interpreter the kernels would otherwise run on fake tensors.
Under the interpreter the kernels are Python that reads tensor data, which cannot be traced, so there
the ops are plain custom ops, opaque to torch.compile.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from .. import reference
from .._layout import (
    RecordedMlpStack,
    StackGrads,
    StackSettings,
    checkpointed_stream,
    compute_rows,
    graph_backward,
    stacked_states,
)
from .._registration import OpEpilogue, register_autograd
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

TRITON_EPILOGUE = OpEpilogue("dmup::triton_scaled_residual", "dmup::triton_scaled_residual_backward")
"""The Triton backend of scaled_residual."""


@triton_residual_stack.register_fake
def _(x, weight, bias, scale, activation, block, mean_subtract, save_for_backward):
    return allocate_stack_outputs(x, weight.shape[0], activation, block, save_for_backward)


@triton_residual_stack_backward.register_fake
def _(grad_out, x, states, signs, pre, weight, bias, scale, activation, block, mean_subtract):
    return allocate_stack_gradients(x, weight, bias)


def _setup_stack(ctx, inputs, output) -> None:
    x, weight, bias, scale, activation, block, mean_subtract, ctx.saved_state = inputs
    ctx.settings = StackSettings(scale, activation, block, mean_subtract)
    _, states, signs, pre = output
    ctx.mark_non_differentiable(states, signs, pre)
    ctx.save_for_backward(x, states, signs, pre, weight, bias)


def _backward_stack(ctx, grad_out: Tensor, _grad_states, _grad_signs, _grad_pre):
    if not ctx.saved_state:
        raise RuntimeError(
            "dmup::triton_residual_stack ran with save_for_backward=False, so it cannot be differentiated"
        )
    x, states, signs, pre, weight, bias = ctx.saved_tensors
    grads = TRITON_STACK.backward(grad_out, FusedState(x, states, signs, pre), weight, bias, ctx.settings)
    return *grads, None, None, None, None, None


register_autograd(
    "dmup::triton_residual_stack",
    _backward_stack,
    setup_context=_setup_stack,
    backward_op="dmup::triton_residual_stack_backward",
)


class FusedState(NamedTuple):
    """What the fused op keeps for its backward: its input rows and its (states, signs, pre)."""

    x: Tensor
    states: Tensor
    signs: Tensor
    pre: Tensor


class TritonStack:
    """The Triton backend of residual_stack: the fused op, or, for rows too wide for its register tiles
    or too few to fill the GPU, a library GEMM per layer and the Triton epilogue kernel. Its state is the
    fused op's ``FusedState``, or the stream autograd recorded (the per-layer path, and checkpointed
    segments, which run under torch.utils.checkpoint)."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, FusedState | list[Tensor]]:
        rows, weight, bias = compute_rows(x, weight, bias)
        if save and settings.checkpoint_every:
            stream = checkpointed_stream(
                lambda rows, weight, bias: self._run(rows, weight, bias, settings, save)[0],
                rows,
                (weight, bias),
                settings.checkpoint_every,
            )
            out, state = stream[-1], stream
        else:
            out, state = self._run(rows, weight, bias, settings, save)
        return out.to(x.dtype).reshape(x.shape), state

    @staticmethod
    def _run(
        rows: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, FusedState | list[Tensor]]:
        width, itemsize = rows.shape[1], rows.element_size()
        if uses_fused_kernels(width, itemsize) and fills_the_gpu(rows.shape[0], width, itemsize, sm_count(rows.device)):
            out, *state = torch.ops.dmup.triton_residual_stack(rows, weight, bias, *settings.layer, save)
            return out, FusedState(rows, *state)
        stream = reference.residual_stream(rows, weight, bias, **settings.layer_options, epilogue=TRITON_EPILOGUE.op)
        return stream[-1], stream

    def backward(
        self,
        grad_out: Tensor,
        state: FusedState | list[Tensor],
        weight: Tensor,
        bias: Tensor | None,
        settings: StackSettings,
    ) -> StackGrads:
        if isinstance(state, FusedState):
            rows, weight, bias = compute_rows(grad_out, weight, bias)
            grad_x, grad_weight, grad_bias = triton_residual_stack_backward(rows, *state, weight, bias, *settings.layer)
            grad_bias = None if bias is None else grad_bias
        else:  # the stream autograd recorded, in rows of the compute dtype
            rows = grad_out.reshape(-1, grad_out.shape[-1]).to(state[-1].dtype)
            grad_x, grad_weight, grad_bias = graph_backward(rows, state, weight, bias)
        return None if grad_x is None else grad_x.reshape(grad_out.shape), grad_weight, grad_bias

    def states(self, state: FusedState | list[Tensor], x: Tensor, out: Tensor) -> Tensor:
        if isinstance(state, FusedState):
            return stacked_states([x, *state.states, out], x)
        return stacked_states(state, x)


TRITON_STACK = TritonStack()

TRITON_MLP_STACK = RecordedMlpStack(TRITON_EPILOGUE.op, kernel_operands=True)
"""The Triton backend of residual_mlp_stack, a layer at a time: library GEMMs for h1 = x W1^T + b1 and h2 =
phi(h1) W2^T + b2, and the Triton epilogue kernel for x + s MS(h2) (docs/design.md §3.7, §3.8)."""
