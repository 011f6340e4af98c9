"""Memory-traffic model: the DRAM bytes one layer of a "post" residual stack, or of an MLP stack, moves, per
implementation.

A model, computed from the shapes, not a measurement: each implementation is a list of the passes it
makes over memory, with the bytes each pass reads and writes. Assumptions: a (n x n) weight is read
from DRAM once per layer (the row-tile programs share it through L2); a tile a program has just
written and reads back at once (the GEMM operand of the fused kernels) is an L2 hit; the activations
of eager PyTorch go through DRAM. With P = B*n*itemsize bytes (one activation tensor), W = n*n*itemsize
and S = the sign bits, a training step of relu with mean subtraction moves about 27P + 3W per layer in
eager PyTorch, 7P + 3W + 2S in the fused block and 4P + 3W + 2S in the depth-fused stack; in inference
12P + W, 2P + W and W. An MLP layer (hidden width m) has two weights of n m elements (each W here) and a
hidden tensor of H = B*m*itemsize bytes; its models are eager PyTorch, the library GEMMs with the fused
epilogues (Triton beyond its depth-fused width records the layer for autograd; the CUDA C++ backward
recomputes h1 and a from x_l) and Triton's depth-fused MLP stack.

    python -m benchmarks.traffic --width 128 --batch 4096 --depth 512 [--hidden-width 512]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from dmup_kernels._layout import sign_planes
from dmup_kernels.triton.residual_mlp_stack import DEPTH_FUSED_MLP_MAX_WIDTH
from dmup_kernels.triton.residual_stack import DEPTH_FUSED_MAX_WIDTH, uses_fused_kernels

from .cases import STACK_OPS, Case

Passes = list[tuple[str, int]]


@dataclass(frozen=True)
class LayerShape:
    """One layer of a post-activation stack, or of an MLP stack (hidden_width m >= 1): width n, batch B, and
    what the epilogue does."""

    width: int
    batch: int
    activation: str = "relu"
    mean_subtract: bool = True
    bias: bool = False
    itemsize: int = 4
    hidden_width: int = 0

    @property
    def act(self) -> int:
        """P: bytes of one (B, n) activation tensor."""
        return self.batch * self.width * self.itemsize

    @property
    def weight(self) -> int:
        """W: bytes of one (n, n) weight, or of one of an MLP layer's (m, n) and (n, m) weights."""
        return self.width * (self.hidden_width or self.width) * self.itemsize

    @property
    def hidden(self) -> int:
        """H: bytes of one (B, m) hidden tensor of an MLP layer."""
        return self.batch * self.hidden_width * self.itemsize

    @property
    def signs(self) -> int:
        """S: bytes of the sign bits the fused kernels keep for phi' (relu 1 plane, abs 2), of h (the stack)
        or of the hidden pre-activation h1 (the MLP stack)."""
        return sign_planes(self.activation, "post") * self.batch * (((self.hidden_width or self.width) + 7) // 8)

    @property
    def pre_activation(self) -> int:
        """Bytes of h the fused kernels keep for a smooth phi (gelu, silu)."""
        return self.act if self.activation in ("gelu", "silu") else 0

    @property
    def bias_bytes(self) -> int:
        return self.width * self.itemsize if self.bias else 0


def eager_passes(s: LayerShape, training: bool) -> Passes:
    """Eager PyTorch (``reference.post_block``): one kernel per op, every intermediate in DRAM."""
    p, w = s.act, s.weight
    forward = [("linear: read x, W; write h", 2 * p + w + s.bias_bytes)]
    if s.activation != "identity":
        forward.append(("phi: read h; write u", 2 * p))
    if s.mean_subtract:
        forward += [("mean: read u", p), ("u - mean: read u; write v", 2 * p)]
    forward += [("s * v: read v; write", 2 * p), ("x + s v: read x, s v; write", 3 * p)]
    if not training:
        return forward
    backward = [("grad of s * v: read g; write", 2 * p)]
    if s.mean_subtract:
        backward += [("grad of mean: read", p), ("grad of u - mean: read, write", 2 * p)]
    if s.activation != "identity":
        backward.append(("phi': read grad, h or u; write dh", 3 * p))
    backward += [
        ("dx = dh W: read dh, W; write", 2 * p + w),
        ("dW = dh^T x: read dh, x; write dW", 2 * p + w),
        ("x grads summed: read 2; write", 3 * p),
    ]
    if s.bias:
        backward.append(("db: read dh", p))
    return forward + backward


def gemm_epilogue_passes(s: LayerShape, training: bool) -> Passes:
    """A library GEMM per layer and the fused epilogue kernel (Triton for n > 1024; the CUDA C++ path)."""
    p, w = s.act, s.weight
    forward = [("GEMM: read x, W; write h", 2 * p + w + s.bias_bytes), ("epilogue: read x, h; write", 3 * p)]
    if not training:
        return forward
    return forward + [
        ("epilogue backward: read g, h; write dh", 3 * p),
        ("dx = dh W: read dh, W; write", 2 * p + w),
        ("x grads summed: read 2; write", 3 * p),
        ("dW = dh^T x: read dh, x; write dW", 2 * p + w),
    ]


def fused_block_passes(s: LayerShape, training: bool) -> Passes:
    """Kernel 2, one launch per layer: GEMM and epilogue in one kernel, x_l read once, x_{l+1} written once."""
    p, w = s.act, s.weight
    saved = s.signs + s.pre_activation if training else 0
    forward = [("fused block: read x, W; write x_next, phi' state", 2 * p + w + s.bias_bytes + saved)]
    if not training:
        return forward
    return forward + [
        ("backward: read g, phi' state, W; write dh, dx", 3 * p + w + saved),
        ("dW, db: read dh, x; write dW", 2 * p + w),
    ]


def depth_fused_passes(s: LayerShape, training: bool) -> Passes:
    """Kernel 3: the residual stream and its gradient stay on chip across layers; only W_l streams in,
    and in training the state the backward needs goes out."""
    p, w = s.act, s.weight
    saved = s.signs + s.pre_activation if training else 0
    forward = [("stack forward: read W; write x_l, phi' state", w + s.bias_bytes + (p + saved if training else 0))]
    if not training:
        return forward
    return forward + [
        ("stack backward: read phi' state, W; write dh", p + w + saved),
        ("dW, db: read dh, x; write dW", 2 * p + w),
    ]


def mlp_eager_passes(s: LayerShape, training: bool) -> Passes:
    """Eager PyTorch (``reference.mlp_block``): one kernel per op, every intermediate in DRAM."""
    p, h, w = s.act, s.hidden, s.weight
    bias1, bias2 = (h // s.batch, p // s.batch) if s.bias else (0, 0)
    forward = [("linear1: read x, W1; write h1", p + w + h + bias1)]
    if s.activation != "identity":
        forward.append(("phi: read h1; write a", 2 * h))
    forward.append(("linear2: read a, W2; write h2", h + w + p + bias2))
    if s.mean_subtract:
        forward += [("mean: read h2", p), ("h2 - mean: read h2; write v", 2 * p)]
    forward += [("s * v: read v; write", 2 * p), ("x + s v: read x, s v; write", 3 * p)]
    if not training:
        return forward
    backward = [("grad of s * v: read g; write dh2", 2 * p)]
    if s.mean_subtract:
        backward += [("grad of mean: read", p), ("grad of h2 - mean: read, write", 2 * p)]
    backward += [("dW2 = dh2^T a: read dh2, a; write dW2", p + h + w), ("da = dh2 W2: read dh2, W2; write", p + w + h)]
    if s.activation != "identity":
        backward.append(("phi': read da, h1 or a; write dh1", 3 * h))
    backward += [
        ("dW1 = dh1^T x: read dh1, x; write dW1", h + p + w),
        ("dx = dh1 W1: read dh1, W1; write", h + w + p),
        ("x grads summed: read 2; write", 3 * p),
    ]
    if s.bias:
        backward.append(("db1, db2: read dh1, dh2", h + p))
    return forward + backward


def mlp_gemm_epilogue_passes(s: LayerShape, training: bool, recompute: bool = False) -> Passes:
    """Library GEMMs and the fused epilogues: the hidden one (bias, phi, sign bits) and the output one (bias,
    MS, scale, residual add). With ``recompute`` (the CUDA C++ backward) h1 and a are rebuilt from x_l per
    layer, and the gradient of x is accumulated in place; otherwise autograd keeps them."""
    p, h, w = s.act, s.hidden, s.weight
    forward = [
        ("GEMM h1 = x W1^T: read x, W1; write h1", p + w + h),
        ("hidden epilogue: read h1; write a (and the sign bits)", 2 * h + (s.signs if training else 0)),
        ("GEMM h2 = a W2^T: read a, W2; write h2", h + w + p),
        ("epilogue: read x, h2; write", 3 * p),
    ]
    if not training:
        return forward
    backward = [("GEMM h1: read x_l, W1; write", p + w + h), ("hidden epilogue: read h1; write a", 2 * h)]
    backward = (backward if recompute else []) + [
        ("epilogue backward: read g; write dh2", 2 * p),
        ("da = dh2 W2: read dh2, W2; write", p + w + h),
        ("phi': read da, h1 or the sign bits; write dh1", 3 * h),
        ("dW2 = dh2^T a: read dh2, a; write dW2", p + h + w),
        ("dW1 = dh1^T x: read dh1, x; write dW1", h + p + w),
    ]
    if recompute:
        return forward + backward + [("g += dh1 W1: read dh1, W1, g; write", h + w + 2 * p)]
    return forward + backward + [("dx = dh1 W1: read dh1, W1; write", h + w + p), ("x grads summed", 3 * p)]


def mlp_depth_fused_passes(s: LayerShape, training: bool) -> Passes:
    """Triton's depth-fused MLP stack: the row tile stays in registers and the hidden layer never reaches
    memory, so a layer's forward reads its two weights and, in training, writes x_l and the sign bits of h1.
    The rows pass of the backward reads the weights (W1 twice for gelu/silu, an L2 hit) and the sign bits or
    x_l, and writes dh2 and dh1; the batched GEMMs then gather x_l, rebuild a from it and form dW1, dW2."""
    p, h, w = s.act, s.hidden, s.weight
    if not training:
        return [("fused layer: read W1, W2", 2 * w)]
    forward = [("fused layer: read W1, W2; write x_l and the sign bits", 2 * w + p + s.signs)]
    phi_state = p if s.activation in ("gelu", "silu") else s.signs
    backward = [
        ("rows pass: read W1, W2, the sign bits or x_l; write dh2, dh1", 2 * w + phi_state + p + h),
        ("gather x_l: read; write", 2 * p),
        ("GEMM h1 = x_l W1^T: read x_l, W1; write h1", p + w + h),
        ("phi: read h1; write a", 2 * h),
        ("dW1 = dh1^T x: read dh1, x; write dW1", h + p + w),
        ("dW2 = dh2^T a: read dh2, a; write dW2", p + h + w),
    ]
    if s.bias:
        backward.append(("db1, db2: read dh1, dh2", h + p))
    return forward + backward


MODELS = {
    "eager": eager_passes,
    "GEMM + epilogue": gemm_epilogue_passes,
    "fused block": fused_block_passes,
    "depth-fused stack": depth_fused_passes,
}
MLP_MODELS = {
    "eager": mlp_eager_passes,
    "GEMM + epilogue": mlp_gemm_epilogue_passes,
    "GEMM + epilogue, recomputed": lambda s, training: mlp_gemm_epilogue_passes(s, training, recompute=True),
    "depth-fused MLP stack": mlp_depth_fused_passes,
}


def models_of(shape: LayerShape) -> dict[str, Callable[[LayerShape, bool], Passes]]:
    """The models of a layer of this shape's kind: MODELS for a stack, MLP_MODELS for an MLP stack."""
    return MLP_MODELS if shape.hidden_width else MODELS


def triton_path(shape: LayerShape) -> str:
    """The kernels the Triton backend runs a stack of this shape with."""
    if shape.hidden_width:
        return "depth-fused MLP stack" if shape.width <= DEPTH_FUSED_MLP_MAX_WIDTH else "GEMM + epilogue"
    if not uses_fused_kernels(shape.width, shape.itemsize):
        return "GEMM + epilogue"
    return "depth-fused stack" if shape.width <= DEPTH_FUSED_MAX_WIDTH else "fused block"


def cuda_path(shape: LayerShape) -> str:
    """The kernels of the CUDA C++ backend: GEMMs and the fused epilogues."""
    return "GEMM + epilogue, recomputed" if shape.hidden_width else "GEMM + epilogue"


VARIANT_MODELS = {"eager": lambda shape: "eager", "triton": triton_path, "cuda": cuda_path}
"""The model of each benchmark variant that has one (torch.compile's fusion and the C++ CPU kernel's cache
use are not modelled)."""


def layer_shape(case: Case) -> LayerShape | None:
    """The traffic model's view of a stack case (None for cases it does not model)."""
    if case.op not in STACK_OPS or case.block != "post":
        return None
    return LayerShape(
        case.width, case.batch, case.activation, case.mean_subtract, case.bias, case.dtype.itemsize, case.hidden_width
    )


def layer_bytes(model: str, shape: LayerShape, training: bool) -> int:
    return sum(nbytes for _, nbytes in models_of(shape)[model](shape, training))


def model_bytes_per_layer(case: Case, variant: str) -> int | None:
    """The model's DRAM bytes per layer for the kernel benchmark variant ``variant`` runs on ``case``
    (None where there is no model)."""
    shape = layer_shape(case)
    if shape is None or variant not in VARIANT_MODELS:
        return None
    return layer_bytes(VARIANT_MODELS[variant](shape), shape, case.mode == "fwd+bwd")


def table(shape: LayerShape, depth: int) -> str:
    """Bytes per layer and per stack for every model, training step and inference, with the ratio to eager."""
    kind = f"MLP block, m={shape.hidden_width}" if shape.hidden_width else "post block"
    lines = [
        f"DRAM traffic model, {kind}, {shape.activation}, MS {'on' if shape.mean_subtract else 'off'}, "
        f"n={shape.width}, B={shape.batch}, L={depth}, {shape.itemsize}-byte floats",
        f"{'model':<28} {'train MiB/layer':>15} {'vs eager':>8} {'infer MiB/layer':>15} {'vs eager':>8} "
        f"{'train GiB/stack':>15}",
    ]
    eager = {mode: layer_bytes("eager", shape, mode) for mode in (True, False)}
    for model in models_of(shape):
        train, infer = layer_bytes(model, shape, True), layer_bytes(model, shape, False)
        lines.append(
            f"{model:<28} {train / 2**20:>15.3f} {eager[True] / train:>7.1f}x {infer / 2**20:>15.3f} "
            f"{eager[False] / infer:>7.1f}x {train * depth / 2**30:>15.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--hidden-width", type=int, default=0, help="m of an MLP stack (default: a stack)")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--itemsize", type=int, default=4)
    args = parser.parse_args(argv)
    shape = LayerShape(args.width, args.batch, args.activation, itemsize=args.itemsize, hidden_width=args.hidden_width)
    print(table(shape, args.depth))
    print("\npasses per layer (training step):")
    for model, passes in models_of(shape).items():
        print(f"  {model}:")
        for name, nbytes in passes(shape, True):
            print(f"    {nbytes / 2**20:9.3f} MiB  {name}")


if __name__ == "__main__":
    main()
