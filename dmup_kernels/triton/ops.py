"""The Triton kernels as torch ops: ``torch.library.triton_op`` + ``wrap_triton``, so that torch.compile
traces into the kernels, with their autograd rules.

    dmup::triton_scaled_residual(x, branch_out, scale, activation, mean_subtract) -> out
    dmup::triton_residual_stack(x, weight, bias?, scale, activation, block, mean_subtract,
                                save_for_backward) -> (out, states, signs, pre)
    dmup::triton_residual_mlp_stack(x, weight1, weight2, bias1?, bias2?, scale, activation, mean_subtract,
                                    save_for_backward) -> (out, states, signs)

They are separate ops from dmup::scaled_residual / dmup::residual_stack / dmup::residual_mlp_stack because a
triton_op owns its schema; ``TRITON_STACK`` and ``TRITON_MLP_STACK`` are the backends that
dmup_kernels.ops.residual_stack and residual_mlp_stack dispatch to, and each chooses between its depth-fused
kernels and a layer at a time (library GEMMs and the epilogue kernel). The autograd rules go through
``dmup_kernels._registration`` like the C++ ops', so torch.func transforms work. The fake (shape)
rules are explicit because under the Triton interpreter the kernels would otherwise run on fake tensors.
Under the interpreter the kernels are Python that reads tensor data, which cannot be traced, so there
the ops are plain custom ops, opaque to torch.compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from .. import reference
from .._layout import (
    MlpStackGrads,
    MlpStackSettings,
    MlpWeights,
    RecordedMlpStack,
    StackGrads,
    StackSettings,
    checkpointed_stream,
    compute_dtype,
    compute_rows,
    graph_backward,
    stacked_states,
)
from .._registration import OpEpilogue, register_autograd
from . import INTERPRETED
from .residual_mlp_stack import (
    allocate_mlp_stack_gradients,
    allocate_mlp_stack_outputs,
    mlp_stack_backward,
    mlp_stack_forward,
    uses_depth_fused_mlp,
)
from .residual_stack import (
    DEPTH_FUSED_MAX_WIDTH,
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
triton_residual_mlp_stack = _define_op("dmup::triton_residual_mlp_stack", mutates_args=())(mlp_stack_forward)
triton_residual_mlp_stack_backward = _define_op("dmup::triton_residual_mlp_stack_backward", mutates_args=())(
    mlp_stack_backward
)

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
    return TRITON_STACK.backward(grad_out, FusedState(x, states, signs, pre), weight, bias, ctx.settings)


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
    def fuses(x: Tensor) -> bool:
        """Whether x's rows run through the fused op: register tiles wide enough for them, in the compute
        dtype, and enough rows to fill the GPU."""
        width, itemsize = x.shape[-1], compute_dtype(x.dtype).itemsize
        return uses_fused_kernels(width, itemsize) and fills_the_gpu(
            x.numel() // width, width, itemsize, sm_count(x.device)
        )

    @classmethod
    def fuses_the_depth(cls, x: Tensor) -> bool:
        """Whether x's rows run through the depth-fused kernels, every layer in one launch."""
        return x.shape[-1] <= DEPTH_FUSED_MAX_WIDTH and cls.fuses(x)

    def _run(
        self, rows: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, FusedState | list[Tensor]]:
        if self.fuses(rows):
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


@triton_residual_mlp_stack.register_fake
def _(x, weight1, weight2, bias1, bias2, scale, activation, mean_subtract, save_for_backward):
    return allocate_mlp_stack_outputs(x, weight1, activation, save_for_backward)


@triton_residual_mlp_stack_backward.register_fake
def _(grad_out, x, states, signs, weight1, weight2, bias1, bias2, scale, activation, mean_subtract):
    return allocate_mlp_stack_gradients(x, weight1, weight2, bias1, bias2)


def _setup_mlp_stack(ctx, inputs, output) -> None:
    x, weight1, weight2, bias1, bias2, scale, activation, mean_subtract, ctx.saved_state = inputs
    ctx.settings = MlpStackSettings(scale, activation, mean_subtract)
    _, states, signs = output
    ctx.mark_non_differentiable(states, signs)
    ctx.save_for_backward(x, states, signs, weight1, weight2, bias1, bias2)


def _backward_mlp_stack(ctx, grad_out: Tensor, _grad_states, _grad_signs):
    if not ctx.saved_state:
        raise RuntimeError(
            "dmup::triton_residual_mlp_stack ran with save_for_backward=False, so it cannot be differentiated"
        )
    x, states, signs, *weights = ctx.saved_tensors
    return TRITON_MLP_STACK.backward(grad_out, FusedMlpState(x, states, signs), MlpWeights(*weights), ctx.settings)


register_autograd(
    "dmup::triton_residual_mlp_stack",
    _backward_mlp_stack,
    setup_context=_setup_mlp_stack,
    backward_op="dmup::triton_residual_mlp_stack_backward",
)


class FusedMlpState(NamedTuple):
    """What the fused MLP op keeps for its backward: its input rows, its states x_1..x_{L-1} and the sign bits
    of the hidden pre-activations; never the (B, m) hidden layer."""

    x: Tensor
    states: Tensor
    signs: Tensor


class TritonMlpStack:
    """The Triton backend of residual_mlp_stack: the depth-fused op, or, for streams wider than its register
    tiles or rows too few to fill the GPU, a layer at a time (``per_layer``: library GEMMs for h1 = x W1^T + b1
    and h2 = phi(h1) W2^T + b2, the Triton epilogue kernel for x + s MS(h2), recorded by autograd). Its state
    is the fused op's ``FusedMlpState``, or the stream autograd recorded (the per-layer path, and checkpointed
    segments, which run under torch.utils.checkpoint)."""

    @property
    def per_layer(self) -> RecordedMlpStack:
        """The per-layer path, its epilogue op looked up on each use (as ``TRITON_EPILOGUE.op`` is)."""
        return RecordedMlpStack(TRITON_EPILOGUE.op, kernel_operands=True)

    @staticmethod
    def fuses_the_depth(x: Tensor, weights: MlpWeights, activation: str) -> bool:
        """Whether x's rows run through the depth-fused op (``uses_depth_fused_mlp``)."""
        hidden_width, width = weights.weight1.shape[1:]
        itemsize = compute_dtype(x.dtype).itemsize
        return uses_depth_fused_mlp(x.numel() // width, width, hidden_width, itemsize, activation, sm_count(x.device))

    def forward(
        self, x: Tensor, weights: MlpWeights, settings: MlpStackSettings, save: bool
    ) -> tuple[Tensor, FusedMlpState | list[Tensor]]:
        if not self.fuses_the_depth(x, weights, settings.activation):
            return self.per_layer.forward(x, weights, settings, save)
        rows, *params = compute_rows(x, *weights)
        if save and settings.checkpoint_every:
            stream = checkpointed_stream(
                lambda rows, *params: self._run(rows, params, settings, save)[0],
                rows,
                params,
                settings.checkpoint_every,
            )
            out, state = stream[-1], stream
        else:
            out, state = self._run(rows, params, settings, save)
        return out.to(x.dtype).reshape(x.shape), state

    @staticmethod
    def _run(
        rows: Tensor, params: Sequence[Tensor | None], settings: MlpStackSettings, save: bool
    ) -> tuple[Tensor, FusedMlpState]:
        out, *state = torch.ops.dmup.triton_residual_mlp_stack(rows, *params, *settings.layer, save)
        return out, FusedMlpState(rows, *state)

    def backward(
        self, grad_out: Tensor, state: FusedMlpState | list[Tensor], weights: MlpWeights, settings: MlpStackSettings
    ) -> MlpStackGrads:
        if not isinstance(state, FusedMlpState):  # the stream autograd recorded
            return self.per_layer.backward(grad_out, state, weights, settings)
        rows, *params = compute_rows(grad_out, *weights)
        grad_x, *grads = triton_residual_mlp_stack_backward(rows, *state, *params, *settings.layer)
        grad_bias1, grad_bias2 = (None if b is None else g for b, g in zip(params[2:], grads[2:]))
        return grad_x.reshape(grad_out.shape), *grads[:2], grad_bias1, grad_bias2

    def states(self, state: FusedMlpState | list[Tensor], x: Tensor, out: Tensor) -> Tensor:
        if isinstance(state, FusedMlpState):
            return stacked_states([x, *state.states, out], x)
        return self.per_layer.states(state, x, out)


TRITON_MLP_STACK = TritonMlpStack()
"""The Triton backend of residual_mlp_stack (docs/design.md §3.7, §3.9)."""
