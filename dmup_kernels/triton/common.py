"""Device functions shared by the Triton kernels: the activations, their derivatives and sign bits.

The formulas match ``dmup_kernels.reference`` (and csrc/activations.h), including what torch's autograd
does with NaN: relu's backward selects (``h <= 0 ? 0 : grad``), abs's multiplies by sgn(h), 0 at NaN.
"""

import triton
import triton.language as tl


@triton.jit
def widen(v):
    """v in the type the kernels compute in: float32 for float16/bfloat16 (tl.exp and tl.sigmoid take no
    bfloat16, and sums over a row in half precision lose the mean or overflow), else v itself. The
    kernels store their results in the tensors' own dtype (tl.store casts to the pointer's type)."""
    if v.dtype == tl.float16 or v.dtype == tl.bfloat16:
        v = v.to(tl.float32)
    return v


@triton.jit
def tanh(z):
    """tanh(z) = 1 - 2 / (exp(2z) + 1): exact limits at +-inf, and no libdevice call (the interpreter has none)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def activation(h, ACT: tl.constexpr):
    """phi(h) for ACT in relu, abs, gelu (tanh form), silu, identity."""
    if ACT == "relu":
        return tl.where(h < 0, 0.0, h)  # not maximum(h, 0): NaN must stay NaN
    elif ACT == "abs":
        return tl.abs(h)
    elif ACT == "gelu":
        # literals, not module constants: compiled kernels only see constexpr globals, which the interpreter mishandles
        return 0.5 * h * (1.0 + tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))  # 0.797... = sqrt(2/pi)
    elif ACT == "silu":
        return h * tl.sigmoid(h)
    else:
        return h


@triton.jit
def sign_bits(h, ACT: tl.constexpr):
    """The sign planes phi' needs: relu [not h <= 0] (torch passes the gradient where h is NaN),
    abs [h > 0] and [h < 0] (torch's sgn(NaN) is 0). Mirrors ``positive_sign_bit`` and
    ``negative_sign_bit`` in csrc/activations.h, the rule the C++ kernels follow."""
    if ACT == "relu":
        positive = (h <= 0) == 0
    else:
        positive = h > 0
    return positive, h < 0


@triton.jit
def chain_sign_bits(grad, positive, negative, ACT: tl.constexpr):
    """grad * phi'(h) from ``sign_bits(h)``, as torch computes it: relu selects (a NaN gradient where
    h <= 0 gives 0), abs multiplies by sgn(h)."""
    if ACT == "relu":
        return tl.where(positive, grad, 0.0)
    else:
        return grad * (positive.to(grad.dtype) - negative.to(grad.dtype))


@triton.jit
def chain_activation(grad, h, ACT: tl.constexpr):
    """grad * phi'(h), the chain rule through ``activation``."""
    if ACT == "relu" or ACT == "abs":
        positive, negative = sign_bits(h, ACT)
        return chain_sign_bits(grad, positive, negative, ACT)
    elif ACT == "gelu":
        t = tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        return grad * (
            0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        )  # 3 * 0.044715
    elif ACT == "silu":
        sig = tl.sigmoid(h)
        return grad * (sig * (1.0 + h * (1.0 - sig)))
    else:
        return grad


@triton.jit
def pack_bits(bits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) boolean tile as (BLOCK_M, BLOCK_N // 8) bytes; bit b of byte k is column 8k + b."""
    grouped = tl.reshape(bits.to(tl.int32), [BLOCK_M, BLOCK_N // 8, 8])
    weights = 1 << tl.arange(0, 8)
    return tl.sum(grouped * weights[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def unpack_bits(packed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The inverse of ``pack_bits``."""
    grouped = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(grouped, [BLOCK_M, BLOCK_N]) != 0


@triton.jit
def store_sign_bits(
    signs, plane_bytes, byte_offs, byte_ok, h, ACT: tl.constexpr, PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Stores ``sign_bits(h)`` of a (BLOCK_M, BLOCK_N) tile, packed, into a layer's PLANES planes of
    ``plane_bytes`` bytes from ``signs``, at ``byte_offs`` where ``byte_ok``."""
    positive, negative = sign_bits(h, ACT)
    tl.store(signs + byte_offs, pack_bits(positive, BLOCK_M, BLOCK_N), mask=byte_ok)
    if PLANES > 1:
        tl.store(signs + plane_bytes + byte_offs, pack_bits(negative, BLOCK_M, BLOCK_N), mask=byte_ok)


@triton.jit
def chain_stored_sign_bits(
    grad, signs, plane_bytes, byte_offs, byte_ok, ACT: tl.constexpr, PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """grad * phi'(h) from the sign bits ``store_sign_bits`` stored for h."""
    positive = unpack_bits(tl.load(signs + byte_offs, mask=byte_ok, other=0), BLOCK_M, BLOCK_N)
    negative = positive
    if PLANES > 1:
        negative = unpack_bits(tl.load(signs + plane_bytes + byte_offs, mask=byte_ok, other=0), BLOCK_M, BLOCK_N)
    return chain_sign_bits(grad, positive, negative, ACT)


@triton.jit
def row_mean(u, n):
    """Mean over the width of a tile whose columns past ``n`` hold zeros."""
    return tl.sum(u, axis=1) / n
