"""residual_mlp_stack: L MLP residual blocks applied in sequence (docs/design.md §2.5)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import (
    check_activation,
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
    MlpStackBackend,
    MlpStackGrads,
    MlpStackSettings,
    MlpWeights,
    RecordedMlpStack,
    check_fake_stack_state,
    check_stack_rows,
    compute_rows,
    fake_stack_outputs,
    sign_planes,
    stacked_states,
)
from .._registration import register_autograd
from ..triton import HAS_TRITON
from ._backend import resolve_backend

if HAS_TRITON:
    from ..triton.ops import TRITON_MLP_STACK


def check_mlp_stack_args(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Tensor | None,
    bias2: Tensor | None,
    scale: float,
    activation: str,
    mean_subtract: bool,
    x_name: str = "x",
) -> float:
    """Validates the arguments of residual_mlp_stack (x named ``x_name``: grad_out in the backward's fake
    rule); returns the scale as a float."""
    check_tensor(weight1, "weight1")
    check_tensor(weight2, "weight2")
    if weight1.dim() != 3 or weight1.shape[0] < 1:
        raise ValueError(
            f"weight1 must have shape (depth, hidden_width, width) with depth >= 1; got {tuple(weight1.shape)}"
        )
    depth, hidden_width, width = weight1.shape
    if hidden_width < 1:
        raise ValueError(f"weight1 must have a hidden width (dim 1) >= 1; got shape {tuple(weight1.shape)}")
    if tuple(weight2.shape) != (depth, width, hidden_width):
        raise ValueError(
            f"weight2 must have shape (depth, width, hidden_width) = {(depth, width, hidden_width)} to match "
            f"weight1 {tuple(weight1.shape)}; got {tuple(weight2.shape)}"
        )
    check_width(x, x_name, width)  # also checks that x is a floating-point tensor
    check_like(weight1, "weight1", x, x_name, autocast=True)
    check_like(weight2, "weight2", x, x_name, autocast=True)
    for bias, name, features in ((bias1, "bias1", hidden_width), (bias2, "bias2", width)):
        if bias is not None:
            check_tensor(bias, name)
            check_shape(bias, name, (depth, features))
            check_like(bias, name, x, x_name, autocast=True)
    check_activation(activation)
    check_flag(mean_subtract, "mean_subtract")
    return check_scale(scale)


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
    checkpoint: int | str | None = None,
    backend: str = "auto",
    return_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Applies ``weight1.shape[0]`` MLP residual blocks to ``x`` of shape (..., n):

    x <- x + scale * MS(phi(x @ W1_l^T + b1_l) @ W2_l^T + b2_l)

    with a hidden width m, and MS (mean subtraction over the width n) only when ``mean_subtract``.

    Args:
        x: the input stream x^0, floating point, shape (..., n).
        weight1: (L, m, n), weight2: (L, n, m), ``nn.Linear`` layout per layer. bias1: (L, m) or None,
            bias2: (L, n) or None.
        scale: the branch multiplier s, a finite real number (e.g. ``DEPTH_MUP.branch_scale(L)``).
        activation: phi on the hidden layer, one of "relu", "abs", "gelu" (tanh form), "silu", "identity".
        mean_subtract: subtract each row's mean over the width n from the branch.
        checkpoint: what the forward keeps for the backward, as in ``residual_stack`` (docs/design.md §4.4):
            None (every layer's input), an int k >= 1 (the stream state every k layers) or "sqrt".
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
        return_states: also return the residual-stream states x^0..x^L, stacked into a tensor of shape
            (L + 1, ..., n) and detached from autograd; ``checkpoint`` then has no effect.

    Returns:
        x^L, of x's shape and dtype; with ``return_states``, the pair (x^L, states).
    """
    scale = check_mlp_stack_args(x, weight1, weight2, bias1, bias2, scale, activation, mean_subtract)
    checkpoint = check_checkpoint(checkpoint)
    check_flag(return_states, "return_states")
    weights = MlpWeights(weight1, weight2, bias1, bias2)
    backend = resolve_backend(
        backend, x.device, triton_fuses=lambda: TRITON_MLP_STACK.fuses_the_depth(x, weights, activation)
    )
    stack = REFERENCE_MLP_STACK if x.numel() == 0 else MLP_STACK_BACKENDS[backend]
    save = return_states or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights)))
    every = 0 if return_states else checkpoint_every(checkpoint, weight1.shape[0])
    out, state = stack.forward(x, weights, MlpStackSettings(scale, activation, mean_subtract, every), save)
    return (out, stack.states(state, x, out)) if return_states else out


class CppMlpStack:
    """The C++ op dmup::residual_mlp_stack (CPU and CUDA kernels); its state is (saved, signs): x^0..x^{L-1}
    (or the checkpoints) feature-major (L, n, B) and the sign bits of the hidden pre-activation (docs/design.md
    §4.4, §4.5)."""

    def forward(
        self, x: Tensor, weights: MlpWeights, settings: MlpStackSettings, save: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        rows, *weights = compute_rows(x, *weights)
        out, saved, signs = torch.ops.dmup.residual_mlp_stack(
            rows, *weights, *settings.layer, save, settings.checkpoint_every
        )
        return out.to(x.dtype).reshape(x.shape), (saved, signs)

    def backward(
        self, grad_out: Tensor, state: tuple[Tensor, Tensor], weights: MlpWeights, settings: MlpStackSettings
    ) -> MlpStackGrads:
        rows, *weights = compute_rows(grad_out, *weights)
        grad_x, *grads = torch.ops.dmup.residual_mlp_stack_backward(rows, *state, *weights, *settings)
        grad_bias1, grad_bias2 = (None if b is None else g for b, g in zip(weights[2:], grads[2:]))
        return grad_x.reshape(grad_out.shape), *grads[:2], grad_bias1, grad_bias2

    def states(self, state: tuple[Tensor, Tensor], x: Tensor, out: Tensor) -> Tensor:
        saved, _ = state
        return stacked_states([*saved.transpose(1, 2), out.reshape(-1, x.shape[-1])], x)


REFERENCE_MLP_STACK = RecordedMlpStack()
CPP_MLP_STACK = CppMlpStack()
MLP_STACK_BACKENDS: dict[str, MlpStackBackend] = {
    "reference": REFERENCE_MLP_STACK,
    "cpp": CPP_MLP_STACK,
    "cuda": CPP_MLP_STACK,
}
if HAS_TRITON:
    MLP_STACK_BACKENDS["triton"] = TRITON_MLP_STACK


if HAS_CPP:
    # The fake rules check the arguments as the function does, and the backward's state as the C++ ops do:
    # torch.compile and meta tensors run only them.
    @torch.library.register_fake("dmup::residual_mlp_stack")
    def _(x, weight1, weight2, bias1, bias2, scale, activation, mean_subtract, save_for_backward, checkpoint_every=0):
        check_stack_rows(x, "x", weight1=weight1, weight2=weight2, bias1=bias1, bias2=bias2)
        check_mlp_stack_args(x, weight1, weight2, bias1, bias2, scale, activation, mean_subtract)
        depth, hidden_width = weight1.shape[:2]
        planes = sign_planes(activation, "post")
        return fake_stack_outputs(x, depth, planes, hidden_width, save_for_backward, checkpoint_every)

    @torch.library.register_fake("dmup::residual_mlp_stack_backward")
    def _(grad_out, saved, signs, weight1, weight2, bias1, bias2, scale, activation, mean_subtract, checkpoint_every=0):
        check_stack_rows(grad_out, "grad_out", weight1=weight1, weight2=weight2, bias1=bias1, bias2=bias2)
        check_mlp_stack_args(grad_out, weight1, weight2, bias1, bias2, scale, activation, mean_subtract, "grad_out")
        depth, hidden_width, width = weight1.shape
        planes = sign_planes(activation, "post")
        check_fake_stack_state(
            "residual_mlp_stack", grad_out, saved, signs, depth, planes, hidden_width, checkpoint_every
        )
        return (
            grad_out.new_empty(grad_out.shape),
            weight1.new_empty(weight1.shape),
            weight2.new_empty(weight2.shape),
            weight1.new_empty(0 if bias1 is None else depth, hidden_width),
            weight1.new_empty(0 if bias2 is None else depth, width),
        )

    def _setup_context(ctx, inputs, output) -> None:
        _, weight1, weight2, bias1, bias2, scale, activation, mean_subtract, ctx.saved_state, *every = inputs
        ctx.settings = MlpStackSettings(scale, activation, mean_subtract, *every)
        _, saved, signs = output
        ctx.mark_non_differentiable(saved, signs)
        ctx.save_for_backward(saved, signs, weight1, weight2, bias1, bias2)

    def _backward(ctx, grad_out, _grad_saved, _grad_signs):
        if not ctx.saved_state:
            raise RuntimeError(
                "dmup::residual_mlp_stack ran with save_for_backward=False, so it cannot be differentiated"
            )
        saved, signs, *weights = ctx.saved_tensors
        return CPP_MLP_STACK.backward(grad_out, (saved, signs), MlpWeights(*weights), ctx.settings)

    register_autograd(
        "dmup::residual_mlp_stack",
        _backward,
        setup_context=_setup_context,
        backward_op="dmup::residual_mlp_stack_backward",
    )
