"""The depth-fused MLP stack and its backward (docs/design.md §2.5, §3.9).

Forward, per layer l, hidden width m, for the hidden units in chunks k of BLOCK_H:
    a_k = phi(x_l @ W1_l[k]^T + b1_l[k]),   h2 = sum_k a_k @ W2_l[:, k]^T,   x_{l+1} = x_l + s * MS(h2 + b2_l)
One program owns a tile of BLOCK_M rows of the residual stream across the full width n and keeps it in
registers while it walks every layer. The row tile is the A operand of the first GEMM and the hidden chunk
that of the second, while the weights stream through in chunks of BLOCK_H hidden units: the (B, m) hidden
layer lives one (BLOCK_M, BLOCK_H) chunk at a time in registers and is never written to memory. Saved for the
backward: x_l (``states``, as the stack's) and, for relu and abs, the sign bits of h1 = x_l W1_l^T + b1_l (the
stack's packing, hidden units in place of features); gelu and silu recompute h1 from x_l.

Backward, per row tile, layers in reverse (g = dLoss/dx_{l+1} in registers), per hidden chunk k:
    dh2 = MS(s g),   dh1_k = phi'(h1_k) * (dh2 @ W2_l[:, k]),   g <- g + sum_k dh1_k @ W1_l[k]
storing dh2_l (L, B, n) and dh1_l (L, B, m). Then the weight gradients with library batched GEMMs:
    dW1_l = dh1_l^T x_l,   dW2_l = dh2_l^T a_l with a_l = phi(x_l W1_l^T + b1_l) rebuilt,   db = sum of rows
Library GEMMs because they spread every layer over the whole GPU, where a Triton kernel like the stack's
weight-gradient kernel runs one program per weight tile over all rows, and because dW2 needs a_l, itself a
GEMM per layer; the price is two transient buffers, x_0..x_{L-1} gathered (L, B, n) and a_l (L, B, m).

Launches: the forward is one launch and the backward one launch plus the batched GEMMs, whatever L is.
TritonMlpStack (ops.py) takes this path for n <= DEPTH_FUSED_MLP_MAX_WIDTH when the row tiles fill the GPU
(``uses_depth_fused_mlp``), else a layer at a time: library GEMMs and the epilogue kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .._layout import sign_planes
from . import INTERPRETED
from .common import (
    activation,
    chain_activation,
    chain_stored_sign_bits,
    row_mean,
    store_sign_bits,
    widen,
)
from .residual_stack import _block_n, _row_tile, _state_ptr, fused_kernels_fill_the_gpu
from .tuning import (
    SHARED_MEMORY_BUDGET,
    fits_registers,
    input_precision,
    itemsize_of,
    launch,
    rows_bucket,
    tuned,
)

DEPTH_FUSED_MLP_MAX_WIDTH = 128
"""The widest stream the depth-fused MLP kernels take (docs/design.md §3.9).

Registers: the backward holds four (BLOCK_M, BLOCK_N) row tiles at once (g, dh2, the dh1 @ W1 accumulator
and, for gelu/silu, x_l) where the stack's kernels hold two or three, plus (BLOCK_M, BLOCK_H) hidden chunks,
and float32's "tf32x3" dot splits each operand in three. At the pinned BLOCK_M = 16 and 8 warps, n = 128 is
4 x 16 x 128 = 8192 row-tile elements, 32 registers per thread before the splits; compiled
(tests/triton_aot.py, sm_80 and sm_90) the kernels take 190-255 registers there, and the float32 gelu/silu
backward spills 64-120 bytes. n = 256 doubles the row tiles: past the 255 registers a thread has at 8 warps,
while 16 warps cap a thread at 128. Shared memory (``_mlp_shared_bytes``): at n = 128 the pinned configs
take at most 65 KiB (float32, BLOCK_H = 16, two stages) and 82 KiB (float64, one stage) of the 96 KiB
budget; n = 256 in float64 would take 3 x 256 x 16 x 8 + 16 x 528 x 8 bytes = 162 KiB with one stage."""

FLOAT64_SIGN_BIT_DOTS = INTERPRETED or tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 9)
"""Whether the float64 MLP backward of relu and abs compiles: Triton 3.6 fails on its dh1 @ W1 dot, whose dh1
comes from the saved sign bits ("fp64 don't support largeK MMA", at every width and hidden width; gelu, silu
and identity compile, and so does every forward: tests/triton_aot.py under Triton 3.6), 3.9 compiles it, and
the interpreter compiles nothing."""


FORWARD_FLAGS = ["ACT", "MEAN_SUBTRACT", "HAS_BIAS1", "HAS_BIAS2", "SAVE", "PLANES", "PRECISION"]
BACKWARD_FLAGS = ["ACT", "MEAN_SUBTRACT", "HAS_BIAS1", "PLANES", "PRECISION"]
"""The compile-time flags that, with the shape, key the autotuning."""


def _mlp_configs() -> list[triton.Config]:
    # not 16 warps: they cap a thread at 128 registers, fewer than the kernels take
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_H": h}, num_warps=w, num_stages=stages)
        for m in (16, 32, 64)
        for h in (16, 32, 64)
        for w in (4, 8)
        for stages in (1, 2, 3)
    ]


def _mlp_shared_bytes(config: triton.Config, block_n: int, itemsize: int) -> int:
    """An upper bound on the shared memory of the MLP kernels: per pipeline stage up to three weight chunks
    (BLOCK_N x BLOCK_H each: W2, W1 and, for gelu/silu in the backward, W1^T), plus the register operands
    tl.dot stages through shared memory (two row tiles, BLOCK_M x BLOCK_N, and a hidden chunk, BLOCK_M x
    BLOCK_H). Checked against the compiled sizes by tests/test_triton_compile.py."""
    m, h = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_H"]
    return (max(1, config.num_stages) * 3 * block_n * h + m * (2 * block_n + h)) * itemsize


def _prune_mlp(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    itemsize, block_n = itemsize_of(args), args["BLOCK_N"]
    kept = [
        c
        for c in configs
        if fits_registers(c, 4 * c.kwargs["BLOCK_M"] * block_n, itemsize)  # four row tiles at once
        and _mlp_shared_bytes(c, block_n, itemsize) <= SHARED_MEMORY_BUDGET
    ]
    return kept or [_pinned_mlp_config(block_n, itemsize)]


def _pinned_mlp_config(block_n: int, itemsize: int) -> triton.Config:
    """The default config of the MLP kernels for a padded width up to DEPTH_FUSED_MLP_MAX_WIDTH, where the
    last candidate always fits SHARED_MEMORY_BUDGET. 16 rows, the fewest tl.dot takes: the kernels hold
    four row tiles, and float32's "tf32x3" dot splits each operand in three (compiled with
    tests/triton_aot.py, 32 rows at n = 64 already spill)."""
    warps = 4 if block_n <= 64 else 8
    for block_h, stages in ((32, 2), (16, 2), (16, 1)):
        config = triton.Config({"BLOCK_M": 16, "BLOCK_H": block_h}, num_warps=warps, num_stages=stages)
        if _mlp_shared_bytes(config, block_n, itemsize) <= SHARED_MEMORY_BUDGET:
            break
    return config


def depth_fused_mlp_compiles(itemsize: int, activation: str) -> bool:
    """Whether this Triton compiles the depth-fused MLP kernels of ``activation`` for elements of ``itemsize``
    (``FLOAT64_SIGN_BIT_DOTS``)."""
    return FLOAT64_SIGN_BIT_DOTS or itemsize != 8 or sign_planes(activation, "post") == 0


def uses_depth_fused_mlp(
    rows: int, width: int, hidden_width: int, itemsize: int, activation: str, sm_count: int | None
) -> bool:
    """Whether the Triton MLP stack runs these rows through the depth-fused kernels: n at most
    DEPTH_FUSED_MLP_MAX_WIDTH and row tiles that fill the GPU (``fused_kernels_fill_the_gpu``, with the
    2 n m itemsize bytes of one block's weights), and not float64 relu or abs before Triton 3.9
    (``FLOAT64_SIGN_BIT_DOTS``)."""
    if width > DEPTH_FUSED_MLP_MAX_WIDTH or not depth_fused_mlp_compiles(itemsize, activation):
        return False
    block_m = _pinned_mlp_config(_block_n(width), itemsize).kwargs["BLOCK_M"]
    return fused_kernels_fill_the_gpu(triton.cdiv(rows, block_m), 2 * width * hidden_width * itemsize, sm_count)


@triton.jit
def _load_tile(ptr, i, j, stride_i, stride_j, i_ok, j_ok):
    """The (len(i), len(j)) tile ptr[i * stride_i + j * stride_j], zero outside i_ok x j_ok: a chunk of a
    weight matrix or of its transpose."""
    return tl.load(ptr + i[:, None] * stride_i + j[None, :] * stride_j, mask=i_ok[:, None] & j_ok[None, :], other=0.0)


@triton.jit
def _hidden_preactivation(
    x_operand, w1, b1_ptr, layer, c, k, c_ok, k_ok, n, m, dtype: tl.constexpr, HAS_BIAS1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """h1 = x W1[k]^T + b1[k] for a row tile and a chunk k of hidden units (the forward's, and the backward's
    recomputation for gelu/silu): the same dot, so the same values."""
    h1 = tl.dot(
        x_operand,
        _load_tile(w1, c, k, 1, n, c_ok, k_ok),  # W1^T[c, k] = W1[k, c]
        tl.zeros([BLOCK_M, BLOCK_H], dtype=dtype),
        input_precision=PRECISION,
        out_dtype=dtype,
    )
    if HAS_BIAS1:
        h1 += widen(tl.load(b1_ptr + tl.cast(layer, tl.int64) * m + k, mask=k_ok, other=0.0))[None, :]
    return h1


@triton.jit
def _mlp_row_tile(rows, n, m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows as ``_row_tile`` gives them (row and column indices, row mask, tile mask, offsets),
    the column mask, the elements of one (rows, n) state and the bytes of one (rows, ceil(m/8)) sign plane."""
    r, c, row_ok, ok, offs, _, _ = _row_tile(rows, n, BLOCK_M, BLOCK_N)
    return r, c, row_ok, ok, offs, c < n, tl.cast(rows, tl.int64) * n, tl.cast(rows, tl.int64) * ((m + 7) // 8)


@triton.jit
def _layer_operands(w1_ptr, w2_ptr, signs_ptr, layer, n, m, plane_bytes, PLANES: tl.constexpr):
    """Where layer ``layer``'s W1 (m, n), W2 (n, m) and sign planes start."""
    return (
        w1_ptr + tl.cast(layer, tl.int64) * m * n,
        w2_ptr + tl.cast(layer, tl.int64) * n * m,
        signs_ptr + layer * PLANES * plane_bytes,
    )


@triton.jit
def _hidden_chunk(h0, r, row_ok, m, BLOCK_H: tl.constexpr):
    """Hidden units h0..h0+BLOCK_H: their indices and mask, offsets and mask into a (rows, m) matrix, and
    offsets and mask into (rows, ceil(m/8)) sign bytes (h0 is a multiple of 8)."""
    k = h0 + tl.arange(0, BLOCK_H)
    k_ok = k < m
    nbytes = (m + 7) // 8
    byte = h0 // 8 + tl.arange(0, BLOCK_H // 8)
    return (
        k,
        k_ok,
        r[:, None] * m + k[None, :],
        row_ok[:, None] & k_ok[None, :],
        r[:, None] * nbytes + byte[None, :],
        row_ok[:, None] & (byte < nbytes)[None, :],
    )


@tuned(_mlp_configs(), key=["n", "m", "rows_bucket", "BLOCK_N", *FORWARD_FLAGS], prune=_prune_mlp)
@triton.jit(do_not_specialize=["rows_bucket"])
def mlp_stack_forward_kernel(
    x_ptr,  # x_0, (rows, n)
    w1_ptr,  # (layers, m, n)
    b1_ptr,  # (layers, m), when HAS_BIAS1
    w2_ptr,  # (layers, n, m)
    b2_ptr,  # (layers, n), when HAS_BIAS2
    out_ptr,  # x of the last layer, (rows, n)
    states_ptr,  # x_1..x_{layers-1}, (layers - 1, rows, n), when SAVE
    signs_ptr,  # (layers, PLANES, rows, ceil(m / 8)) uint8
    rows,
    n,
    m,
    num_layers,
    rows_bucket,  # autotuning key only
    scale: tl.float64,  # a Python float would be passed as float32
    ACT: tl.constexpr,
    MEAN_SUBTRACT: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    SAVE: tl.constexpr,
    PLANES: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    r, c, row_ok, ok, offs, c_ok, layer_elems, plane_bytes = _mlp_row_tile(rows, n, m, BLOCK_M, BLOCK_N)
    operand_type = w1_ptr.dtype.element_ty  # tl.dot takes half operands as they are

    if x_ptr.dtype.element_ty != tl.float64:  # inline: the interpreter rounds floats passed to a jit call
        scale = tl.cast(scale, tl.float32)
    x = widen(tl.load(x_ptr + offs, mask=ok, other=0.0))
    for layer in range(num_layers):
        if SAVE:
            if layer > 0:
                tl.store(states_ptr + (layer - 1) * layer_elems + offs, x, mask=ok)
        w1, w2, signs = _layer_operands(w1_ptr, w2_ptr, signs_ptr, layer, n, m, plane_bytes, PLANES)
        x_operand = x.to(operand_type)
        h2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=x.dtype)
        for h0 in range(0, m, BLOCK_H):
            k, k_ok, _hidden_offs, _hidden_ok, byte_offs, byte_ok = _hidden_chunk(h0, r, row_ok, m, BLOCK_H)
            h1 = _hidden_preactivation(x_operand, w1, b1_ptr, layer, c, k, c_ok, k_ok, n, m, x.dtype, HAS_BIAS1,
                                       PRECISION, BLOCK_M, BLOCK_H)  # fmt: skip
            # Padded hidden units hold 0 (not 0 * inf = NaN from a non-finite row), so they add nothing to h2.
            h1 = tl.where(k_ok[None, :], h1, 0.0)
            if PLANES > 0:
                store_sign_bits(signs, plane_bytes, byte_offs, byte_ok, h1, ACT, PLANES, BLOCK_M, BLOCK_H)
            a = activation(h1, ACT)
            h2 = tl.dot(
                a.to(operand_type),
                _load_tile(w2, k, c, 1, m, k_ok, c_ok),  # W2^T[k, c] = W2[c, k]
                h2,
                input_precision=PRECISION,
                out_dtype=h2.dtype,
            )
        if HAS_BIAS2:
            h2 += widen(tl.load(b2_ptr + tl.cast(layer, tl.int64) * n + c, mask=c_ok, other=0.0))[None, :]
        u = tl.where(ok, h2, 0.0)
        if MEAN_SUBTRACT:
            u = tl.where(ok, u - row_mean(u, n)[:, None], 0.0)
        x = x + scale * u
    tl.store(out_ptr + offs, x, mask=ok)


@tuned(_mlp_configs(), key=["n", "m", "rows_bucket", "BLOCK_N", *BACKWARD_FLAGS], prune=_prune_mlp)
@triton.jit(do_not_specialize=["rows_bucket"])
def mlp_stack_backward_kernel(
    grad_out_ptr,  # dLoss/dx of the last layer, (rows, n)
    x_ptr,  # x_0
    states_ptr,  # x_1..x_{layers-1}
    signs_ptr,  # (layers, PLANES, rows, ceil(m / 8))
    w1_ptr,
    b1_ptr,
    w2_ptr,
    grad_x_ptr,  # dLoss/dx_0, (rows, n)
    grad_h1_ptr,  # dh1_l, (layers, rows, m)
    grad_h2_ptr,  # dh2_l, (layers, rows, n)
    rows,
    n,
    m,
    num_layers,
    rows_bucket,
    scale: tl.float64,
    ACT: tl.constexpr,
    MEAN_SUBTRACT: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    PLANES: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    r, c, row_ok, ok, offs, c_ok, layer_elems, plane_bytes = _mlp_row_tile(rows, n, m, BLOCK_M, BLOCK_N)
    hidden_elems = tl.cast(rows, tl.int64) * m
    operand_type = w1_ptr.dtype.element_ty

    if grad_out_ptr.dtype.element_ty != tl.float64:  # inline: the interpreter rounds floats passed to a jit call
        scale = tl.cast(scale, tl.float32)
    g = widen(tl.load(grad_out_ptr + offs, mask=ok, other=0.0))
    for step in range(num_layers):
        layer = num_layers - 1 - step
        w1, w2, signs = _layer_operands(w1_ptr, w2_ptr, signs_ptr, layer, n, m, plane_bytes, PLANES)
        dh2 = scale * g
        if MEAN_SUBTRACT:
            dh2 = tl.where(ok, dh2 - row_mean(dh2, n)[:, None], 0.0)
        tl.store(grad_h2_ptr + layer * layer_elems + offs, dh2, mask=ok)
        dh2_operand = dh2.to(operand_type)
        if PLANES == 0 and ACT != "identity":  # gelu, silu: phi' needs h1, recomputed from x_l
            x_l = tl.load(_state_ptr(x_ptr, states_ptr, layer, layer_elems) + offs, mask=ok, other=0.0)
            x_operand = x_l.to(operand_type)
        back = tl.zeros([BLOCK_M, BLOCK_N], dtype=g.dtype)
        for h0 in range(0, m, BLOCK_H):
            k, k_ok, hidden_offs, hidden_ok, byte_offs, byte_ok = _hidden_chunk(h0, r, row_ok, m, BLOCK_H)
            da = tl.dot(
                dh2_operand,
                _load_tile(w2, c, k, m, 1, c_ok, k_ok),
                tl.zeros([BLOCK_M, BLOCK_H], dtype=g.dtype),
                input_precision=PRECISION,
                out_dtype=g.dtype,
            )
            if PLANES > 0:
                dh1 = chain_stored_sign_bits(da, signs, plane_bytes, byte_offs, byte_ok, ACT, PLANES, BLOCK_M, BLOCK_H)
            elif ACT == "identity":
                dh1 = da
            else:
                h1 = _hidden_preactivation(x_operand, w1, b1_ptr, layer, c, k, c_ok, k_ok, n, m, g.dtype, HAS_BIAS1,
                                           PRECISION, BLOCK_M, BLOCK_H)  # fmt: skip
                dh1 = chain_activation(da, h1, ACT)
            dh1 = tl.where(hidden_ok, dh1, 0.0)
            tl.store(grad_h1_ptr + layer * hidden_elems + hidden_offs, dh1, mask=hidden_ok)
            back = tl.dot(dh1.to(operand_type), _load_tile(w1, k, c, n, 1, k_ok, c_ok), back, input_precision=PRECISION,
                          out_dtype=back.dtype)  # fmt: skip
        g = g + tl.where(ok, back, 0.0)
    tl.store(grad_x_ptr + offs, g, mask=ok)


def allocate_mlp_stack_outputs(
    x: Tensor, weight1: Tensor, activation: str, save_for_backward: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (out, states, signs) of ``mlp_stack_forward`` (also its fake rule)."""
    rows, n = x.shape
    depth, m = weight1.shape[:2]
    kept = depth if save_for_backward else 0
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(max(kept - 1, 0), rows, n),
        x.new_empty(kept, sign_planes(activation, "post"), rows, (m + 7) // 8, dtype=torch.uint8),
    )


def allocate_mlp_stack_gradients(
    x: Tensor, weight1: Tensor, weight2: Tensor, bias1: Tensor | None, bias2: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Uninitialised (grad_x, grad_weight1, grad_weight2, grad_bias1, grad_bias2) of ``mlp_stack_backward``
    (also its fake rule); a bias's gradient has 0 rows without it."""
    depth, m, n = weight1.shape
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight1, memory_format=torch.contiguous_format),
        torch.empty_like(weight2, memory_format=torch.contiguous_format),
        weight1.new_empty(0 if bias1 is None else depth, m),
        weight1.new_empty(0 if bias2 is None else depth, n),
    )


def mlp_stack_forward(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Tensor | None,
    bias2: Tensor | None,
    scale: float,
    activation: str,
    mean_subtract: bool,
    save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the MLP stack on x (rows, n); returns (out, states, signs).

    states (L-1, rows, n) holds x_1..x_{L-1}; signs (L, planes, rows, ceil(m/8)) uint8 the sign bits of the
    hidden pre-activations (relu 1 plane, abs 2, else none). Without save_for_backward they have 0 layers.
    """
    x, weight1, weight2 = x.contiguous(), weight1.contiguous(), weight2.contiguous()
    bias1, bias2 = (None if b is None else b.contiguous() for b in (bias1, bias2))
    rows, n = x.shape
    depth, m = weight1.shape[:2]
    out, states, signs = allocate_mlp_stack_outputs(x, weight1, activation, save_for_backward)
    if rows == 0:
        return out, states, signs
    block_n = _block_n(n)
    launch(
        mlp_stack_forward_kernel,
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
        _pinned_mlp_config(block_n, x.element_size()),
        x,
        weight1,
        weight1 if bias1 is None else bias1,
        weight2,
        weight2 if bias2 is None else bias2,
        out,
        states,
        signs,
        rows,
        n,
        m,
        depth,
        rows_bucket(rows),
        scale,
        ACT=activation,
        MEAN_SUBTRACT=mean_subtract,
        HAS_BIAS1=bias1 is not None,
        HAS_BIAS2=bias2 is not None,
        SAVE=save_for_backward,
        PLANES=signs.shape[1] if save_for_backward else 0,
        PRECISION=input_precision(x.dtype),
        BLOCK_N=block_n,
    )
    return out, states, signs


def mlp_stack_backward(
    grad_out: Tensor,
    x: Tensor,
    states: Tensor,
    signs: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Tensor | None,
    bias2: Tensor | None,
    scale: float,
    activation: str,
    mean_subtract: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_x, grad_weight1, grad_weight2, grad_bias1, grad_bias2) of ``mlp_stack_forward``; a
    bias's gradient has 0 rows without it."""
    grad_out, x, weight1, weight2 = grad_out.contiguous(), x.contiguous(), weight1.contiguous(), weight2.contiguous()
    bias1 = None if bias1 is None else bias1.contiguous()
    rows, n = x.shape
    depth, m = weight1.shape[:2]
    grads = allocate_mlp_stack_gradients(x, weight1, weight2, bias1, bias2)
    if rows == 0:
        return tuple(grad.zero_() for grad in grads)
    grad_x, grad_weight1, grad_weight2, grad_bias1, grad_bias2 = grads
    grad_h1, grad_h2 = x.new_empty(depth, rows, m), x.new_empty(depth, rows, n)
    block_n = _block_n(n)
    launch(
        mlp_stack_backward_kernel,
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
        _pinned_mlp_config(block_n, x.element_size()),
        grad_out,
        x,
        states,
        signs,
        weight1,
        weight1 if bias1 is None else bias1,
        weight2,
        grad_x,
        grad_h1,
        grad_h2,
        rows,
        n,
        m,
        depth,
        rows_bucket(rows),
        scale,
        ACT=activation,
        MEAN_SUBTRACT=mean_subtract,
        HAS_BIAS1=bias1 is not None,
        PLANES=signs.shape[1],
        PRECISION=input_precision(x.dtype),
        BLOCK_N=block_n,
    )
    inputs = torch.cat([x[None], states])  # x_0..x_{L-1}
    weight1_t = weight1.transpose(1, 2)
    hidden = torch.bmm(inputs, weight1_t) if bias1 is None else torch.baddbmm(bias1[:, None], inputs, weight1_t)
    torch.bmm(grad_h1.transpose(1, 2), inputs, out=grad_weight1)
    torch.bmm(grad_h2.transpose(1, 2), reference.activation(hidden, activation), out=grad_weight2)
    for bias, grad_h, grad_bias in ((bias1, grad_h1, grad_bias1), (bias2, grad_h2, grad_bias2)):
        if bias is not None:
            torch.sum(grad_h, 1, out=grad_bias)
    return grads
