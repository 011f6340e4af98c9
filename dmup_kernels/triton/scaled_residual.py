"""Kernel 1: the residual epilogue ``scaled_residual`` and its backward, one program per block of rows.

forward:  out      = x + s * (u - mean(u)),        u = phi(b)      (b = branch_out)
backward: grad_b   = phi'(b) * (v - mean(v)),       v = s * g       (g = grad_out; grad_x = g)
(the mean only with mean subtraction; MS is its own adjoint). A row of width n <= 8192 lies in one
tile, so the mean is a register reduction and each input is read once; wider rows take two passes,
the first for the mean.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import activation, chain_activation, row_mean, widen
from .tuning import fits_registers, itemsize_of, launch, rows_bucket, tuned, warps_for_tile

ONE_PASS_MAX_WIDTH = 8192
TWO_PASS_CHUNK = 4096


@triton.jit
def _row_value(a, b, scale, ACT: tl.constexpr, BACKWARD: tl.constexpr):
    """u = phi(b) in the forward, v = s * g in the backward."""
    if BACKWARD:
        return scale * a
    else:
        return activation(b, ACT)


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8, 16)]


def _prune(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    itemsize = itemsize_of(args)
    fits = [c for c in configs if fits_registers(c, c.kwargs["BLOCK_M"] * args["BLOCK_N"], itemsize)]
    return fits or [_pinned_config(args["BLOCK_N"], itemsize)]


def _pinned_config(block_n: int, itemsize: int) -> triton.Config:
    block_m = max(1, min(64, 2048 // block_n))
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps_for_tile(block_m * block_n, itemsize))


@tuned(_configs(), key=["n", "rows_bucket", "BLOCK_N", "ACT", "MEAN_SUBTRACT", "BACKWARD"], prune=_prune)
@triton.jit(do_not_specialize=["rows_bucket"])
def scaled_residual_kernel(
    a_ptr,  # x (forward) or grad_out (backward), (rows, n) contiguous
    b_ptr,  # branch_out, (rows, n) contiguous
    out_ptr,  # out (forward) or grad_branch (backward)
    rows,
    n,
    rows_bucket,  # autotuning key only
    scale: tl.float64,  # a Python float would be passed as float32
    ACT: tl.constexpr,
    MEAN_SUBTRACT: tl.constexpr,
    BACKWARD: tl.constexpr,
    TWO_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # float32 arithmetic for half-precision tensors, scale included (see common.widen)
    if out_ptr.dtype.element_ty != tl.float64:  # inline: the interpreter rounds floats passed to a jit call
        scale = tl.cast(scale, tl.float32)
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    mean = widen(tl.zeros([BLOCK_M], dtype=out_ptr.dtype.element_ty))
    if MEAN_SUBTRACT and TWO_PASS:
        total = widen(tl.zeros([BLOCK_M], dtype=out_ptr.dtype.element_ty))
        for c0 in range(0, n, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (c < n)[None, :]
            offs = r[:, None] * n + c[None, :]
            a = widen(tl.load(a_ptr + offs, mask=ok, other=0.0))
            b = widen(tl.load(b_ptr + offs, mask=ok, other=0.0))
            total += tl.sum(tl.where(ok, _row_value(a, b, scale, ACT, BACKWARD), 0.0), axis=1)
        mean = total / n
    for c0 in range(0, n, BLOCK_N):  # one iteration unless TWO_PASS
        c = c0 + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (c < n)[None, :]
        offs = r[:, None] * n + c[None, :]
        a = widen(tl.load(a_ptr + offs, mask=ok, other=0.0))
        b = widen(tl.load(b_ptr + offs, mask=ok, other=0.0))
        value = tl.where(ok, _row_value(a, b, scale, ACT, BACKWARD), 0.0)
        if MEAN_SUBTRACT and not TWO_PASS:
            mean = row_mean(value, n)
        centred = value - mean[:, None]
        if BACKWARD:
            out = chain_activation(centred, b, ACT)
        else:
            out = a + scale * centred
        tl.store(out_ptr + offs, out, mask=ok)


def _launch(a: Tensor, b: Tensor, scale: float, activation: str, mean_subtract: bool, backward: bool) -> Tensor:
    """Runs the kernel over the rows of ``a`` and ``b`` (shape (..., n)); returns a tensor shaped like them."""
    n = a.shape[-1]
    a2, b2 = a.reshape(-1, n).contiguous(), b.reshape(-1, n).contiguous()
    out = torch.empty_like(a2)
    rows = a2.shape[0]
    if rows == 0 or n == 0:
        return out.reshape(a.shape)
    two_pass = n > ONE_PASS_MAX_WIDTH
    block_n = TWO_PASS_CHUNK if two_pass else max(16, triton.next_power_of_2(n))
    launch(
        scaled_residual_kernel,
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
        _pinned_config(block_n, a2.element_size()),
        a2,
        b2,
        out,
        rows,
        n,
        rows_bucket(rows),
        scale,
        ACT=activation,
        MEAN_SUBTRACT=mean_subtract,
        BACKWARD=backward,
        TWO_PASS=two_pass,
        BLOCK_N=block_n,
    )
    return out.reshape(a.shape)


def scaled_residual_forward(
    x: Tensor, branch_out: Tensor, scale: float, activation: str, mean_subtract: bool
) -> Tensor:
    """x + scale * MS(phi(branch_out))."""
    return _launch(x, branch_out, scale, activation, mean_subtract, backward=False)


def scaled_residual_backward(
    grad_out: Tensor, branch_out: Tensor, scale: float, activation: str, mean_subtract: bool
) -> Tensor:
    """The gradient with respect to branch_out: phi'(branch_out) * MS(scale * grad_out)."""
    return _launch(grad_out, branch_out, scale, activation, mean_subtract, backward=True)
