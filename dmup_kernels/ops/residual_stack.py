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
from ..triton import HAS_TRITON
from ._autograd import register_autograd
from ._backend import resolve_backend
from ._layout import mask_words, sign_planes

if HAS_TRITON:
    from ..triton.residual_stack import fills_the_gpu, sm_count, uses_fused_kernels


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
    settings = {"scale": scale, "activation": activation, "block": block, "mean_subtract": mean_subtract}
    if backend == "reference" or x.numel() == 0:
        states = reference.residual_stream(x, weight, bias, **settings)
        return (states[-1], torch.stack(states).detach()) if return_states else states[-1]
    # The kernels run float32 or float64; half types run with a float32 residual stream.
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    rows = x.reshape(-1, x.shape[-1]).to(compute)
    weight_c = weight.to(compute)
    bias_c = None if bias is None else bias.to(compute)
    params = (x, weight) if bias is None else (x, weight, bias)
    save_for_backward = return_states or (torch.is_grad_enabled() and any(t.requires_grad for t in params))
    fused = backend == "triton" and (
        uses_fused_kernels(x.shape[-1], rows.element_size())
        and fills_the_gpu(rows.shape[0], x.shape[-1], rows.element_size(), sm_count(x.device))
    )
    if backend == "triton" and not fused:
        # Rows too wide for one register tile, or too few of them to occupy the GPU: a library GEMM per
        # layer, then the Triton epilogue kernel.
        stream = reference.residual_stream(
            rows, weight_c, bias_c, **settings, epilogue=torch.ops.dmup.triton_scaled_residual
        )
        out, states = stream[-1], (torch.stack(stream) if return_states else None)
    elif backend == "triton":
        out, inner, _, _ = torch.ops.dmup.triton_residual_stack(
            rows, weight_c, bias_c, scale, activation, block, mean_subtract, save_for_backward
        )
        states = torch.cat([rows.unsqueeze(0), inner, out.unsqueeze(0)]) if return_states else None
    else:
        out, saved, _ = torch.ops.dmup.residual_stack(
            rows, weight_c, bias_c, scale, activation, block, mean_subtract, save_for_backward
        )
        # saved holds x^0..x^{L-1} feature-major (L, n, B); the output is x^L.
        states = torch.cat([saved.transpose(1, 2), out.unsqueeze(0)]) if return_states else None
    y = out.to(x.dtype).reshape(x.shape)
    if not return_states:
        return y
    return y, states.detach().to(x.dtype).reshape(weight.shape[0] + 1, *x.shape)


if HAS_CPP:

    @torch.library.register_fake("dmup::residual_stack")
    def _(x, weight, bias, scale, activation, block, mean_subtract, save_for_backward):
        batch, width = x.shape
        kept = weight.shape[0] if save_for_backward else 0
        mask_shape = (kept, sign_planes(activation, block), width, mask_words(batch))
        return x.new_empty(batch, width), x.new_empty(kept, width, batch), x.new_empty(mask_shape, dtype=torch.int16)

    @torch.library.register_fake("dmup::residual_stack_backward")
    def _(grad_out, saved, mask, weight, bias, scale, activation, block, mean_subtract):
        bias_rows = 0 if bias is None else weight.shape[0]
        return (
            grad_out.new_empty(grad_out.shape),
            weight.new_empty(weight.shape),
            weight.new_empty(bias_rows, weight.shape[1]),
        )

    def _setup_context(ctx, inputs, output) -> None:
        _, weight, bias, *ctx.settings, ctx.saved_state = inputs
        _, saved, mask = output
        ctx.mark_non_differentiable(saved, mask)
        ctx.save_for_backward(saved, mask, weight, bias)

    def _backward(ctx, grad_out, _grad_saved, _grad_mask):
        if not ctx.saved_state:
            raise RuntimeError("dmup::residual_stack ran with save_for_backward=False, so it cannot be differentiated")
        saved, mask, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.dmup.residual_stack_backward(
            grad_out, saved, mask, weight, bias, *ctx.settings
        )
        return grad_x, grad_weight, None if bias is None else grad_bias, None, None, None, None, None

    register_autograd(
        "dmup::residual_stack", _backward, setup_context=_setup_context, backward_op="dmup::residual_stack_backward"
    )
