"""Kernels 2 and 3: the fused block and the depth-fused stack, and their backward.

Forward, per layer l (post block; the pre block applies phi to the GEMM operand as it loads it and
none to h):
    h = x_l @ W_l^T + b_l,   x_{l+1} = x_l + s * MS(phi(h))
One program owns a tile of BLOCK_M rows of the residual stream, across the full width n, and keeps
it in registers while it walks its layers, streaming W_l: one tiled GEMM per layer with the whole
epilogue (bias, phi, mean over the width, scale, residual add) before the single store. The GEMM
reads its operand x_l in K-chunks from global memory, where the program has just written it (the
saved state the backward needs; in inference a one-slot scratch that stays in cache). It also saves
what the backward needs for phi': sign bits for relu and abs, h for gelu and silu.

Backward, per row tile, layers in reverse (g = dLoss/dx_{l+1} in registers):
    post: dh = phi'(h) * MS(s g),      g <- g + dh @ W_l
    pre:  dz = MS(s g),                g <- g + (dz @ W_l) * phi'(x_l)
storing dh_l (dz_l); then one batched GEMM over all layers gives dW_l = dh_l^T a_l (a_l = x_l, or
phi(x_l) for pre) and db_l = sum over rows of dh_l.

Launches: for n <= DEPTH_FUSED_MAX_WIDTH the whole stack is one forward launch and two backward
launches, whatever L is; wider stacks (up to FUSED_BLOCK_MAX_WIDTH, while the operand buffers fit
shared memory: ``uses_fused_kernels``) launch the same kernels once per layer (the fused block).
States x_1..x_{L-1} live in ``states`` (L-1, B, n); x_0 is the input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import sign_planes
from .common import (
    activation,
    chain_activation,
    chain_stored_sign_bits,
    row_mean,
    store_sign_bits,
    widen,
)
from .tuning import (
    SHARED_MEMORY_BUDGET,
    fits_registers,
    input_precision,
    itemsize_of,
    launch,
    rows_bucket,
    tuned,
    warps_for_tile,
)

DEPTH_FUSED_MAX_WIDTH = 256
FUSED_BLOCK_MAX_WIDTH = 1024


def saves_pre_activation(activation: str, block: str) -> bool:
    """The post block keeps h for the smooth activations, whose derivative needs its value."""
    return block == "post" and activation in ("gelu", "silu")


@triton.jit
def _row_tile(rows, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's BLOCK_M rows across the full width: row indices (int64), column indices, the row
    mask, the tile mask, offsets into a (rows, n) matrix, and offsets and mask into (rows, ceil(n/8))
    sign bytes."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    row_ok = r < rows
    nbytes = (n + 7) // 8
    byte = tl.arange(0, BLOCK_N // 8)
    return (
        r,
        c,
        row_ok,
        row_ok[:, None] & (c < n)[None, :],
        r[:, None] * n + c[None, :],
        r[:, None] * nbytes + byte[None, :],
        row_ok[:, None] & (byte < nbytes)[None, :],
    )


@triton.jit
def _state_ptr(x_ptr, states_ptr, layer, state_stride):
    """Where x_layer lies: the input for layer 0, else slot layer - 1 of the states."""
    if layer == 0:
        ptr = x_ptr
    else:
        ptr = states_ptr + tl.cast(layer - 1, tl.int64) * state_stride
    return ptr


@triton.jit
def _matmul_rows(
    a_ptr, w_ptr, r, row_ok, n,
    TRANSPOSE_W: tl.constexpr, PHI_ON_A: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) tile of A @ W^T (TRANSPOSE_W) or A @ W, A the rows ``r`` of a (rows, n) matrix
    in K-chunks (phi applied on load when PHI_ON_A), W (n, n) row-major."""
    c = tl.arange(0, BLOCK_N)
    acc = widen(tl.zeros([BLOCK_M, BLOCK_N], dtype=a_ptr.dtype.element_ty))
    for k0 in range(0, n, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + r[:, None] * n + k[None, :], mask=row_ok[:, None] & (k < n)[None, :], other=0.0)
        if PHI_ON_A:
            a = activation(widen(a), ACT).to(a_ptr.dtype.element_ty)  # tl.dot takes half operands as they are
        if TRANSPOSE_W:  # W^T[k, c] = W[c, k]
            w = tl.load(w_ptr + c[None, :] * n + k[:, None], mask=(k < n)[:, None] & (c < n)[None, :], other=0.0)
        else:
            w = tl.load(w_ptr + k[:, None] * n + c[None, :], mask=(k < n)[:, None] & (c < n)[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


FORWARD_FLAGS = ["ACT", "PRE_BLOCK", "MEAN_SUBTRACT", "HAS_BIAS", "PLANES", "SAVE_PRE", "PRECISION"]
BACKWARD_FLAGS = ["ACT", "PRE_BLOCK", "MEAN_SUBTRACT", "PLANES", "SAVE_PRE", "PRECISION"]
"""The compile-time flags that, with the shape, key the autotuning (training and inference tune apart)."""


def _stack_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=stages)
        for m in (16, 32, 64)
        for k in (16, 32, 64)
        for w in (4, 8, 16)
        for stages in (1, 2, 3)
    ]


def _stack_shared_bytes(config: triton.Config, block_n: int, itemsize: int, arch: int = 90) -> int:
    """An upper bound on the shared memory of the stack kernels on GPUs of compute capability ``arch``
    (80 for sm_80; the sm_90 bound, the larger, when the device is unknown).

    Rule (compiled sizes from tests/triton_aot.py): the K-loop pipelines an A chunk (BLOCK_M x BLOCK_K)
    and a W chunk (BLOCK_K x BLOCK_N) per stage. With mma.sync (sm_80, and sm_90 below 64 rows) that is
    num_stages - 1 chunk pairs in flight. From 64 rows on, sm_90 runs tl.dot as wgmma: num_stages pairs,
    plus the float32 accumulator tile (BLOCK_M x BLOCK_N) staged through shared memory for the row-wise
    epilogue; 64 rows x 256 columns then take 64-72 KiB where sm_80 takes 16-40 KiB."""
    m, k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    if arch >= 90 and m >= 64:
        return config.num_stages * (m + block_n) * k * itemsize + m * block_n * 4
    return max(1, config.num_stages - 1) * (m + block_n) * k * itemsize


def _fits(config: triton.Config, block_n: int, itemsize: int, arch: int = 90) -> bool:
    return (
        fits_registers(config, config.kwargs["BLOCK_M"] * block_n, itemsize)
        and config.kwargs["BLOCK_K"] <= block_n
        and _stack_shared_bytes(config, block_n, itemsize, arch) <= SHARED_MEMORY_BUDGET
    )


def _prune_stack(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    # The row tile and the accumulator live in registers, the pipelined operands in shared memory.
    itemsize, block_n = itemsize_of(args), args["BLOCK_N"]
    device = next(value.device for value in args.values() if isinstance(value, torch.Tensor))
    arch = 90 if device.type != "cuda" else 10 * torch.cuda.get_device_capability(device)[0]
    return [c for c in configs if _fits(c, block_n, itemsize, arch)] or [_pinned_stack_config(block_n, itemsize)]


def _pinned_stack_config(block_n: int, itemsize: int) -> triton.Config | None:
    """The default config of the stack kernels for a padded width; None when no config's operand
    buffers fit SHARED_MEMORY_BUDGET (the stack then takes the GEMM + epilogue path)."""
    block_m = 32 if block_n <= 128 else 16  # tl.dot needs at least 16 rows
    warps = warps_for_tile(block_m * block_n, itemsize)
    for block_k, stages in ((32, 3), (32, 2), (16, 2), (16, 1)):
        config = triton.Config(
            {"BLOCK_M": block_m, "BLOCK_K": min(block_n, block_k)}, num_warps=warps, num_stages=stages
        )
        if _stack_shared_bytes(config, block_n, itemsize) <= SHARED_MEMORY_BUDGET:
            return config
    return None


def uses_fused_kernels(width: int, itemsize: int) -> bool:
    """Whether the Triton stack runs rows of this width with the fused kernels; wider rows, or rows
    whose operand buffers would not fit shared memory, take a library GEMM per layer + the epilogue kernel."""
    return width <= FUSED_BLOCK_MAX_WIDTH and _pinned_stack_config(_block_n(width), itemsize) is not None


FUSED_MIN_SM_FILL = 0.5
"""The fused kernels need programs for at least this share of the SMs, unless a layer's weights are small
(FUSED_SMALL_LAYER_BYTES); see ``fused_kernels_fill_the_gpu``. An estimate, to be checked on each GPU by make
gpu-check."""

FUSED_SMALL_LAYER_BYTES = 256 * 1024
"""Weights of one layer (n * n * itemsize for the stack) that one SM streams in about the time of the two
launches (GEMM + epilogue) a layer costs on the per-layer path: n = 256 in float32."""


def fused_kernels_fill_the_gpu(programs: int, layer_bytes: int, sm_count: int | None) -> bool:
    """Whether depth-fused kernels of ``programs`` row tiles beat a library GEMM per layer + the epilogue
    kernel, by occupancy.

    The fused kernels run one program per row tile, each taking its rows through every layer in turn while
    it streams each layer's whole weights (``layer_bytes``): a layer costs one tile's time however many SMs
    idle. A GEMM per layer spreads each layer over all SMs, at the price of its launches and a round trip of
    x_l through memory. Rule: fused when the programs keep at least FUSED_MIN_SM_FILL of the SMs busy, or
    when a layer's weights are at most FUSED_SMALL_LAYER_BYTES, since then one tile takes less time than the
    launches it saves. With no SM count (CPU tensors under the interpreter) always fused.
    """
    return sm_count is None or layer_bytes <= FUSED_SMALL_LAYER_BYTES or programs >= FUSED_MIN_SM_FILL * sm_count


def fills_the_gpu(rows: int, width: int, itemsize: int, sm_count: int | None) -> bool:
    """``fused_kernels_fill_the_gpu`` for the stack kernels: n * n * itemsize bytes of weights per layer,
    programs of the pinned config's BLOCK_M rows (autotuning may pick a larger one)."""
    block_m = _pinned_stack_config(_block_n(width), itemsize).kwargs["BLOCK_M"]
    return fused_kernels_fill_the_gpu(triton.cdiv(rows, block_m), width * width * itemsize, sm_count)


def sm_count(device: torch.device) -> int | None:
    """The streaming multiprocessors of a CUDA device; None for other devices."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@tuned(_stack_configs(), key=["n", "rows_bucket", "BLOCK_N", *FORWARD_FLAGS], prune=_prune_stack)
@triton.jit(do_not_specialize=["rows_bucket"])
def stack_forward_kernel(
    x_ptr,  # x_0 of the first layer, (rows, n)
    w_ptr,  # (layers, n, n)
    bias_ptr,  # (layers, n) or unused
    out_ptr,  # x of the last layer, (rows, n)
    states_ptr,  # x_1..x_{layers-1}, (layers - 1, rows, n); a one-slot scratch when state_stride == 0
    signs_ptr,  # (layers, planes, rows, ceil(n / 8)) uint8, when PLANES
    pre_ptr,  # h, (layers, rows, n), when SAVE_PRE
    rows,
    n,
    num_layers,
    rows_bucket,  # autotuning key only
    scale: tl.float64,  # a Python float would be passed as float32
    state_stride,
    ACT: tl.constexpr,
    PRE_BLOCK: tl.constexpr,
    MEAN_SUBTRACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PLANES: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    r, c, row_ok, ok, offs, byte_offs, byte_ok = _row_tile(rows, n, BLOCK_M, BLOCK_N)
    layer_elems = tl.cast(rows, tl.int64) * n
    plane_bytes = tl.cast(rows, tl.int64) * ((n + 7) // 8)

    # float32 arithmetic for half-precision tensors, scale included (see common.widen)
    if x_ptr.dtype.element_ty != tl.float64:  # inline: the interpreter rounds floats passed to a jit call
        scale = tl.cast(scale, tl.float32)
    x = widen(tl.load(x_ptr + offs, mask=ok, other=0.0))
    for layer in range(num_layers):
        if layer > 0:
            # Stored through states_ptr itself (not the selected pointer below), so that torch.compile's
            # analysis of the kernel sees x_ptr as read-only.
            tl.debug_barrier()  # the scratch slot may still be read by the previous layer's GEMM
            tl.store(states_ptr + tl.cast(layer - 1, tl.int64) * state_stride + offs, x, mask=ok)
            tl.debug_barrier()  # the GEMM below reads what other threads of this program stored
        a_ptr = _state_ptr(x_ptr, states_ptr, layer, state_stride)
        h = _matmul_rows(
            a_ptr, w_ptr + tl.cast(layer, tl.int64) * n * n, r, row_ok, n,
            True, PRE_BLOCK, ACT, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        if HAS_BIAS:
            h += widen(tl.load(bias_ptr + tl.cast(layer, tl.int64) * n + c, mask=c < n, other=0.0))[None, :]
        if PRE_BLOCK:
            u = h
        else:
            if PLANES > 0:
                signs = signs_ptr + layer * PLANES * plane_bytes
                store_sign_bits(signs, plane_bytes, byte_offs, byte_ok, h, ACT, PLANES, BLOCK_M, BLOCK_N)
            if SAVE_PRE:
                tl.store(pre_ptr + layer * layer_elems + offs, h, mask=ok)
            u = activation(h, ACT)
        u = tl.where(ok, u, 0.0)
        if MEAN_SUBTRACT:
            u = tl.where(ok, u - row_mean(u, n)[:, None], 0.0)
        x = x + scale * u
    tl.store(out_ptr + offs, x, mask=ok)


@tuned(_stack_configs(), key=["n", "rows_bucket", "BLOCK_N", *BACKWARD_FLAGS], prune=_prune_stack)
@triton.jit(do_not_specialize=["rows_bucket"])
def stack_backward_kernel(
    grad_out_ptr,  # dLoss/dx of the last layer, (rows, n)
    x_ptr,  # x_0 of the first layer
    states_ptr,  # x_1..x_{layers-1}
    signs_ptr,
    pre_ptr,
    w_ptr,
    grad_x_ptr,  # dLoss/dx_0, (rows, n)
    grad_h_ptr,  # dh_l (post) or dz_l (pre), (layers, rows, n)
    rows,
    n,
    num_layers,
    rows_bucket,
    scale: tl.float64,
    state_stride,
    ACT: tl.constexpr,
    PRE_BLOCK: tl.constexpr,
    MEAN_SUBTRACT: tl.constexpr,
    PLANES: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    r, c, row_ok, ok, offs, byte_offs, byte_ok = _row_tile(rows, n, BLOCK_M, BLOCK_N)
    layer_elems = tl.cast(rows, tl.int64) * n
    plane_bytes = tl.cast(rows, tl.int64) * ((n + 7) // 8)

    if grad_out_ptr.dtype.element_ty != tl.float64:  # inline: the interpreter rounds floats passed to a jit call
        scale = tl.cast(scale, tl.float32)
    g = widen(tl.load(grad_out_ptr + offs, mask=ok, other=0.0))
    for step in range(num_layers):
        layer = num_layers - 1 - step
        dv = scale * g
        if MEAN_SUBTRACT:
            dv = tl.where(ok, dv - row_mean(dv, n)[:, None], 0.0)
        if PRE_BLOCK:
            dh = dv
        elif PLANES > 0:
            signs = signs_ptr + layer * PLANES * plane_bytes
            dh = chain_stored_sign_bits(dv, signs, plane_bytes, byte_offs, byte_ok, ACT, PLANES, BLOCK_M, BLOCK_N)
        elif SAVE_PRE:
            dh = chain_activation(dv, widen(tl.load(pre_ptr + layer * layer_elems + offs, mask=ok, other=0.0)), ACT)
        else:
            dh = dv
        dh = tl.where(ok, dh, 0.0)
        grad_h = grad_h_ptr + layer * layer_elems
        tl.store(grad_h + offs, dh, mask=ok)
        tl.debug_barrier()  # the GEMM reads dh rows stored by other threads of this program
        back = _matmul_rows(
            grad_h,
            w_ptr + tl.cast(layer, tl.int64) * n * n,
            r,
            row_ok,
            n,
            False,
            False,
            ACT,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
        )
        if PRE_BLOCK:
            x = widen(tl.load(_state_ptr(x_ptr, states_ptr, layer, state_stride) + offs, mask=ok, other=0.0))
            back = chain_activation(back, x, ACT)
        g = g + tl.where(ok, back, 0.0)
    tl.store(grad_x_ptr + offs, g, mask=ok)


def _weight_grad_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_I": i, "BLOCK_J": j, "BLOCK_R": r}, num_warps=4, num_stages=3)
        for i in (32, 64)
        for j in (32, 64)
        for r in (32, 64)
    ]


def _pinned_weight_grad_config(n: int) -> triton.Config:
    block = 64 if n >= 256 else 32
    return triton.Config({"BLOCK_I": block, "BLOCK_J": block, "BLOCK_R": 32}, num_warps=4, num_stages=3)


@tuned(_weight_grad_configs(), key=["n", "rows_bucket", "ACT", "PRE_BLOCK", "HAS_BIAS", "PRECISION"])
@triton.jit(do_not_specialize=["rows_bucket"])
def stack_weight_grad_kernel(
    grad_h_ptr,  # (layers, rows, n)
    x_ptr,
    states_ptr,
    grad_w_ptr,  # (layers, n, n)
    grad_b_ptr,  # (layers, n), when HAS_BIAS
    rows,
    n,
    rows_bucket,
    state_stride,
    ACT: tl.constexpr,
    PRE_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dW_l[i, j] = sum_r dh_l[r, i] a_l[r, j] with a_l = x_l (post) or phi(x_l) (pre); db_l[i] = sum_r dh_l[r, i].
    Grid: (layers, tiles of i, tiles of j)."""
    layer = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    grad_h = grad_h_ptr + tl.cast(layer, tl.int64) * rows * n
    a_ptr = _state_ptr(x_ptr, states_ptr, layer, state_stride)
    acc = widen(tl.zeros([BLOCK_I, BLOCK_J], dtype=grad_w_ptr.dtype.element_ty))
    bias_acc = widen(tl.zeros([BLOCK_I], dtype=grad_w_ptr.dtype.element_ty))
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = r < rows
        dh_t = tl.load(grad_h + r[None, :] * n + i[:, None], mask=row_ok[None, :] & (i < n)[:, None], other=0.0)
        a = tl.load(a_ptr + r[:, None] * n + j[None, :], mask=row_ok[:, None] & (j < n)[None, :], other=0.0)
        if PRE_BLOCK:
            a = activation(widen(a), ACT).to(a_ptr.dtype.element_ty)
        acc = tl.dot(dh_t, a, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if HAS_BIAS:
            bias_acc += tl.sum(widen(dh_t), axis=1)
    layer_w = grad_w_ptr + tl.cast(layer, tl.int64) * n * n
    tl.store(layer_w + i[:, None] * n + j[None, :], acc, mask=(i < n)[:, None] & (j < n)[None, :])
    if HAS_BIAS and tl.program_id(2) == 0:
        tl.store(grad_b_ptr + tl.cast(layer, tl.int64) * n + i, bias_acc, mask=i < n)


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _layer_groups(n: int, depth: int) -> list[tuple[int, int]]:
    """The layer ranges [l0, l1) each launch runs: all at once up to DEPTH_FUSED_MAX_WIDTH, else one by one."""
    if n <= DEPTH_FUSED_MAX_WIDTH:
        return [(0, depth)]
    return [(layer, layer + 1) for layer in range(depth)]


def allocate_stack_outputs(
    x: Tensor, depth: int, activation: str, block: str, save_for_backward: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uninitialised (out, states, signs, pre) of ``stack_forward`` (also its fake rule)."""
    rows, n = x.shape
    kept = depth if save_for_backward else 0
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(max(kept - 1, 0), rows, n),
        x.new_empty(kept, sign_planes(activation, block), rows, (n + 7) // 8, dtype=torch.uint8),
        x.new_empty(kept if saves_pre_activation(activation, block) else 0, rows, n),
    )


def allocate_stack_gradients(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (grad_x, grad_weight, grad_bias) of ``stack_backward`` (also its fake rule)."""
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty(0 if bias is None else weight.shape[0], weight.shape[1]),
    )


def stack_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: float,
    activation: str,
    block: str,
    mean_subtract: bool,
    save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs the stack on x (rows, n); returns (out, states, signs, pre).

    states (L-1, rows, n) holds x_1..x_{L-1}; signs (L, planes, rows, ceil(n/8)) uint8 the sign bits of
    h; pre (L, rows, n) the pre-activations h (gelu, silu). Without save_for_backward they have 0 layers.
    """
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows, n = x.shape
    depth = weight.shape[0]
    out, states, signs, pre = allocate_stack_outputs(x, depth, activation, block, save_for_backward)
    if rows == 0:
        return out, states, signs, pre
    # Between per-layer launches in inference, x_l lives in a ring of two slots; a depth-fused launch in
    # inference keeps it in one scratch slot that every layer overwrites (state_stride 0).
    groups = _layer_groups(n, depth)
    if save_for_backward:
        stream, state_stride = states, states.stride(0)
    else:
        stream, state_stride = x.new_empty(min(depth - 1, 1 if len(groups) == 1 else 2), rows, n), 0
    block_n = _block_n(n)
    for l0, l1 in groups:
        launch(
            stack_forward_kernel,
            lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
            _pinned_stack_config(block_n, x.element_size()),
            _state_at(x, stream, l0),
            weight[l0:l1],
            weight if bias is None else bias[l0:l1],
            out if l1 == depth else _state_at(x, stream, l1),
            # a launch of one layer writes no state: pass a tensor that overlaps none of its outputs
            stream if l1 - l0 > 1 else x.new_empty(0),
            signs[l0:l1],
            pre[l0:l1],
            rows,
            n,
            l1 - l0,
            rows_bucket(rows),
            scale,
            state_stride,
            ACT=activation,
            PRE_BLOCK=block == "pre",
            MEAN_SUBTRACT=mean_subtract,
            HAS_BIAS=bias is not None,
            PLANES=signs.shape[1] if save_for_backward else 0,
            SAVE_PRE=pre.shape[0] > 0,
            PRECISION=input_precision(x.dtype),
            BLOCK_N=block_n,
        )
    return out, states, signs, pre


def _state_at(x: Tensor, states: Tensor, layer: int) -> Tensor:
    """x_layer as a (rows, n) tensor: the input for layer 0, else a slot of the states (a ring when
    there are fewer slots than layers)."""
    return x if layer == 0 else states[(layer - 1) % states.shape[0]]


def stack_backward(
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
    """Gradients (grad_x, grad_weight, grad_bias) of ``stack_forward``; grad_bias has 0 rows without bias."""
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    rows, n = x.shape
    depth = weight.shape[0]
    grad_x, grad_w, grad_b = allocate_stack_gradients(x, weight, bias)
    grad_h = x.new_empty(depth, rows, n)
    if rows == 0:
        return grad_x.zero_(), grad_w.zero_(), grad_b.zero_()
    block_n = _block_n(n)
    precision = input_precision(x.dtype)
    groups = _layer_groups(n, depth)
    grad_ring = x.new_empty(min(len(groups) - 1, 2), rows, n)  # gradients between per-layer launches
    for l0, l1 in reversed(groups):
        launch(
            stack_backward_kernel,
            lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
            _pinned_stack_config(block_n, x.element_size()),
            grad_out if l1 == depth else grad_ring[l1 % grad_ring.shape[0]],
            _state_at(x, states, l0),
            states if l1 - l0 > 1 else x.new_empty(0),  # a launch of one layer reads x_l0 only
            signs[l0:l1],
            pre[l0:l1],
            weight[l0:l1],
            grad_x if l0 == 0 else grad_ring[l0 % grad_ring.shape[0]],
            grad_h[l0:l1],
            rows,
            n,
            l1 - l0,
            rows_bucket(rows),
            scale,
            states.stride(0),
            ACT=activation,
            PRE_BLOCK=block == "pre",
            MEAN_SUBTRACT=mean_subtract,
            PLANES=signs.shape[1],
            SAVE_PRE=pre.shape[0] > 0,
            PRECISION=precision,
            BLOCK_N=block_n,
        )
    launch(
        stack_weight_grad_kernel,
        lambda meta: (depth, triton.cdiv(n, meta["BLOCK_I"]), triton.cdiv(n, meta["BLOCK_J"])),
        _pinned_weight_grad_config(n),
        grad_h,
        x,
        states,
        grad_w,
        grad_w if bias is None else grad_b,
        rows,
        n,
        rows_bucket(rows),
        states.stride(0),
        ACT=activation,
        PRE_BLOCK=block == "pre",
        HAS_BIAS=bias is not None,
        PRECISION=precision,
    )
    return grad_x, grad_w, grad_b
