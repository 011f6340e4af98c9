"""residual_stack: L residual blocks of one form applied in sequence (docs/design.md §2.2-§2.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import (
    check_activation,
    check_block,
    check_checkpoint,
    check_flag,
    check_like,
    check_scale,
    check_shape,
    check_tensor,
    check_width,
    checkpoint_every,
)
from .._extension import HAS_CPP
from .._layout import (
    StackBackend,
    StackGrads,
    StackSettings,
    check_fake_stack_state,
    check_stack_rows,
    checkpointed_stream,
    compute_rows,
    fake_stack_outputs,
    graph_backward,
    sign_planes,
    stacked_states,
)
from .._registration import register_autograd
from ..triton import HAS_TRITON
from ._backend import resolve_backend

if HAS_TRITON:
    from ..triton.ops import TRITON_STACK


def check_stack_args(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: float,
    activation: str,
    block: str,
    mean_subtract: bool,
    x_name: str = "x",
) -> float:
    """Validates the arguments of residual_stack (x named ``x_name``: grad_out in the backward's fake rule);
    returns the scale as a float."""
    check_tensor(weight, "weight")
    if weight.dim() != 3 or weight.shape[0] < 1 or weight.shape[1] != weight.shape[2]:
        raise ValueError(f"weight must have shape (depth, width, width) with depth >= 1; got {tuple(weight.shape)}")
    check_width(x, x_name, weight.shape[-1])  # also checks that x is a floating-point tensor
    check_like(weight, "weight", x, x_name, autocast=True)
    if bias is not None:
        check_tensor(bias, "bias")
        check_shape(bias, "bias", weight.shape[:2])
        check_like(bias, "bias", x, x_name, autocast=True)
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
    checkpoint: int | str | None = None,
    return_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Applies ``weight.shape[0]`` residual blocks to ``x`` of shape (..., n).

    block "post": x <- x + scale * MS(phi(x @ W_l^T + b_l))
    block "pre":  x <- x + scale * MS(phi(x) @ W_l^T + b_l)
    MS (mean subtraction over the width) only when ``mean_subtract``.

    Args:
        x: the input stream x^0, floating point, shape (..., n).
        weight: (L, n, n), ``nn.Linear`` layout per layer. bias: (L, n) or None.
        scale: the branch multiplier s, a finite real number (e.g. ``DEPTH_MUP.branch_scale(L)``).
        activation: phi, one of "relu", "abs", "gelu" (tanh form), "silu", "identity".
        block: "post" or "pre", where phi sits (above).
        mean_subtract: subtract each row's mean over the width from the branch.
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
        checkpoint: what the forward keeps for the backward (docs/design.md §4.4). None: every layer's
            input. An int k >= 1: the stream state every k layers only (x^0, x^k, x^2k, ...); the backward
            recomputes each segment of k layers from its checkpoint, for about one more forward pass of
            time, and on the cpp backend gives gradients bitwise equal to None's. "sqrt": k = ceil(sqrt(L)),
            which keeps about 2 sqrt(L) states instead of L.
        return_states: also return the residual-stream states x^0..x^L, stacked into a tensor of shape
            (L + 1, ..., n) and detached from autograd (for diagnostics); the output stays differentiable.
            Returning every state, the forward keeps every state: ``checkpoint`` then has no effect.

    Returns:
        x^L, of x's shape and dtype; with ``return_states``, the pair (x^L, states).
    """
    scale = check_stack_args(x, weight, bias, scale, activation, block, mean_subtract)
    checkpoint = check_checkpoint(checkpoint)
    check_flag(return_states, "return_states")
    backend = resolve_backend(backend, x.device, triton_fuses=lambda: TRITON_STACK.fuses_the_depth(x))
    stack = REFERENCE_STACK if x.numel() == 0 else STACK_BACKENDS[backend]
    params = (x, weight) if bias is None else (x, weight, bias)
    save = return_states or (torch.is_grad_enabled() and any(t.requires_grad for t in params))
    every = 0 if return_states else checkpoint_every(checkpoint, weight.shape[0])
    out, state = stack.forward(x, weight, bias, StackSettings(scale, activation, block, mean_subtract, every), save)
    return (out, stack.states(state, x, out)) if return_states else out


class ReferenceStack:
    """Eager PyTorch; its state is the recorded stream x^0..x^L (x^0, x^k, ..., x^L with checkpoints),
    which autograd differentiates through."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, list[Tensor]]:
        def run(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return reference.residual_stream(x, weight, bias, **settings.layer_options)[-1]

        if save and settings.checkpoint_every:
            stream = checkpointed_stream(run, x, (weight, bias), settings.checkpoint_every)
        else:
            stream = reference.residual_stream(x, weight, bias, **settings.layer_options)
        return stream[-1], stream

    def backward(
        self, grad_out: Tensor, state: list[Tensor], weight: Tensor, bias: Tensor | None, settings: StackSettings
    ) -> StackGrads:
        return graph_backward(grad_out, state, weight, bias)

    def states(self, state: list[Tensor], x: Tensor, out: Tensor) -> Tensor:
        return stacked_states(state, x)


class CppStack:
    """The C++ op dmup::residual_stack (CPU and CUDA kernels); its state is (saved, signs): x^0..x^{L-1}
    (or the checkpoints x^0, x^k, ...) feature-major (L, n, B) and the sign bits (docs/design.md §4)."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        rows, weight, bias = compute_rows(x, weight, bias)
        out, saved, signs = torch.ops.dmup.residual_stack(
            rows, weight, bias, *settings.layer, save, settings.checkpoint_every
        )
        return out.to(x.dtype).reshape(x.shape), (saved, signs)

    def backward(
        self,
        grad_out: Tensor,
        state: tuple[Tensor, Tensor],
        weight: Tensor,
        bias: Tensor | None,
        settings: StackSettings,
    ) -> StackGrads:
        rows, weight, bias = compute_rows(grad_out, weight, bias)
        grad_x, grad_weight, grad_bias = torch.ops.dmup.residual_stack_backward(rows, *state, weight, bias, *settings)
        return grad_x.reshape(grad_out.shape), grad_weight, None if bias is None else grad_bias

    def states(self, state: tuple[Tensor, Tensor], x: Tensor, out: Tensor) -> Tensor:
        saved, _ = state
        return stacked_states([*saved.transpose(1, 2), out.reshape(-1, x.shape[-1])], x)


REFERENCE_STACK = ReferenceStack()
CPP_STACK = CppStack()
STACK_BACKENDS: dict[str, StackBackend] = {"reference": REFERENCE_STACK, "cpp": CPP_STACK, "cuda": CPP_STACK}
if HAS_TRITON:
    STACK_BACKENDS["triton"] = TRITON_STACK


if HAS_CPP:
    # The fake rules check the arguments as the function does, and the backward's state as the C++ ops do:
    # torch.compile and meta tensors run only them.
    @torch.library.register_fake("dmup::residual_stack")
    def _(x, weight, bias, scale, activation, block, mean_subtract, save_for_backward, checkpoint_every=0):
        check_stack_rows(x, "x", weight=weight, bias=bias)
        check_stack_args(x, weight, bias, scale, activation, block, mean_subtract)
        planes, width = sign_planes(activation, block), x.shape[1]
        return fake_stack_outputs(x, weight.shape[0], planes, width, save_for_backward, checkpoint_every)

    @torch.library.register_fake("dmup::residual_stack_backward")
    def _(grad_out, states, signs, weight, bias, scale, activation, block, mean_subtract, checkpoint_every=0):
        check_stack_rows(grad_out, "grad_out", weight=weight, bias=bias)
        check_stack_args(grad_out, weight, bias, scale, activation, block, mean_subtract, x_name="grad_out")
        planes, width = sign_planes(activation, block), weight.shape[1]
        check_fake_stack_state(
            "residual_stack", grad_out, states, signs, weight.shape[0], planes, width, checkpoint_every
        )
        bias_rows = 0 if bias is None else weight.shape[0]
        return (
            grad_out.new_empty(grad_out.shape),
            weight.new_empty(weight.shape),
            weight.new_empty(bias_rows, weight.shape[1]),
        )

    def _setup_context(ctx, inputs, output) -> None:
        _, weight, bias, scale, activation, block, mean_subtract, ctx.saved_state, *every = inputs
        ctx.settings = StackSettings(scale, activation, block, mean_subtract, *every)
        _, saved, signs = output
        ctx.mark_non_differentiable(saved, signs)
        ctx.save_for_backward(saved, signs, weight, bias)

    def _backward(ctx, grad_out, _grad_saved, _grad_signs):
        if not ctx.saved_state:
            raise RuntimeError("dmup::residual_stack ran with save_for_backward=False, so it cannot be differentiated")
        saved, signs, weight, bias = ctx.saved_tensors
        return CPP_STACK.backward(grad_out, (saved, signs), weight, bias, ctx.settings)

    register_autograd(
        "dmup::residual_stack", _backward, setup_context=_setup_context, backward_op="dmup::residual_stack_backward"
    )
