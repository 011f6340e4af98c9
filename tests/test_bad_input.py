"""Bad input raises ValueError/TypeError whose message names the argument (and the expected value), on the
"reference" and "cpp" backends alike: validation runs before dispatch. Also: an empty batch (B = 0) is not
bad input; it gives an empty result, forward and backward, as torch ops do.

A second device is simulated with the "meta" device, so the device checks run on a CPU-only machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dmup_kernels import (
    DepthMuPNet,
    DepthParametrization,
    ResidualMLPStack,
    ResidualStack,
    ScaledResidual,
    param_groups,
    residual_mlp_stack,
    residual_stack,
    scaled_residual,
)
from dmup_kernels import diagnostics as dg

from conftest import needs_cpp, needs_triton

BACKENDS_UNDER_TEST = ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]


def t(*shape, dtype=torch.float32, device="cpu"):
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(*shape, dtype=dtype, device=device)
    return torch.ones(*shape, dtype=dtype, device=device)


X = lambda: t(4, 8)  # noqa: E731
W = lambda: t(3, 8, 8)  # noqa: E731
W1 = lambda: t(3, 5, 8)  # noqa: E731  (depth 3, hidden width 5, width 8)
W2 = lambda: t(3, 8, 5)  # noqa: E731
COMPLEX = torch.complex64
INT = torch.int64

# (id, call(backend), exception, regex the message must match)
SCALED_RESIDUAL_CASES = [
    (
        "x-not-tensor",
        lambda b: scaled_residual([[1.0, 2.0]], X(), 0.5, backend=b),
        TypeError,
        r"x must be a torch\.Tensor",
    ),
    ("x-numpy", lambda b: scaled_residual(X().numpy(), X(), 0.5, backend=b), TypeError, r"\bx\b.*Tensor"),
    (
        "branch-not-tensor",
        lambda b: scaled_residual(X(), 3.0, 0.5, backend=b),
        TypeError,
        r"branch_out must be a torch\.Tensor",
    ),
    ("x-int", lambda b: scaled_residual(t(4, 8, dtype=INT), X(), 0.5, backend=b), TypeError, r"\bx\b.*floating"),
    (
        "branch-int",
        lambda b: scaled_residual(X(), t(4, 8, dtype=torch.int32), 0.5, backend=b),
        TypeError,
        r"branch_out.*floating",
    ),
    (
        "x-bool",
        lambda b: scaled_residual(t(4, 8, dtype=torch.bool), X(), 0.5, backend=b),
        TypeError,
        r"\bx\b.*floating",
    ),
    (
        "x-complex",
        lambda b: scaled_residual(t(4, 8, dtype=COMPLEX), X(), 0.5, backend=b),
        TypeError,
        r"\bx\b.*floating.*complex64",
    ),
    (
        "branch-complex",
        lambda b: scaled_residual(X(), t(4, 8, dtype=COMPLEX), 0.5, backend=b),
        TypeError,
        r"branch_out.*floating",
    ),
    (
        "dtype-mismatch",
        lambda b: scaled_residual(X(), t(4, 8, dtype=torch.float64), 0.5, backend=b),
        TypeError,
        r"branch_out.*dtype.*float32",
    ),
    (
        "dtype-mismatch-half",
        lambda b: scaled_residual(X(), t(4, 8, dtype=torch.bfloat16), 0.5, backend=b),
        TypeError,
        r"branch_out.*dtype.*float32.*bfloat16",
    ),
    (
        "shape-mismatch",
        lambda b: scaled_residual(X(), t(4, 7), 0.5, backend=b),
        ValueError,
        r"branch_out.*shape.*\(4, 8\)",
    ),
    (
        "broadcast-shape",
        lambda b: scaled_residual(X(), t(1, 8), 0.5, backend=b),
        ValueError,
        r"branch_out.*shape.*\(4, 8\)",
    ),
    ("rank-mismatch", lambda b: scaled_residual(X(), t(32), 0.5, backend=b), ValueError, r"branch_out.*shape"),
    (
        "branch-on-meta",
        lambda b: scaled_residual(X(), t(4, 8, device="meta"), 0.5, backend=b),
        ValueError,
        r"branch_out.*device.*cpu",
    ),
    (
        "x-on-meta",
        lambda b: scaled_residual(t(4, 8, device="meta"), X(), 0.5, backend=b),
        ValueError,
        r"branch_out.*device of x \(meta\)",
    ),
    (
        "0-dim",
        lambda b: scaled_residual(torch.tensor(1.0), torch.tensor(2.0), 0.5, backend=b),
        ValueError,
        r"\bx\b.*dim",
    ),
    ("scale-nan", lambda b: scaled_residual(X(), X(), math.nan, backend=b), ValueError, r"scale.*finite"),
    ("scale-inf", lambda b: scaled_residual(X(), X(), -math.inf, backend=b), ValueError, r"scale.*finite"),
    ("scale-str", lambda b: scaled_residual(X(), X(), "0.5", backend=b), TypeError, r"scale"),
    ("scale-none", lambda b: scaled_residual(X(), X(), None, backend=b), TypeError, r"scale"),
    ("scale-bool", lambda b: scaled_residual(X(), X(), True, backend=b), TypeError, r"scale.*real number"),
    (
        "activation",
        lambda b: scaled_residual(X(), X(), 0.5, "tanh", backend=b),
        ValueError,
        r"activation.*'relu'.*'tanh'",
    ),
    ("activation-case", lambda b: scaled_residual(X(), X(), 0.5, "ReLU", backend=b), ValueError, r"activation"),
    (
        "mean_subtract",
        lambda b: scaled_residual(X(), X(), 0.5, "relu", "yes", backend=b),
        TypeError,
        r"mean_subtract.*bool",
    ),
]

STACK_CASES = [
    (
        "weight-2d",
        lambda b: residual_stack(X(), t(8, 8), scale=0.5, backend=b),
        ValueError,
        r"weight.*\(depth, width, width\)",
    ),
    ("weight-4d", lambda b: residual_stack(X(), t(1, 3, 8, 8), scale=0.5, backend=b), ValueError, r"weight.*shape"),
    (
        "weight-not-square",
        lambda b: residual_stack(X(), t(3, 8, 7), scale=0.5, backend=b),
        ValueError,
        r"weight.*shape",
    ),
    (
        "weight-depth-0",
        lambda b: residual_stack(X(), t(0, 8, 8), scale=0.5, backend=b),
        ValueError,
        r"weight.*depth >= 1",
    ),
    ("weight-not-tensor", lambda b: residual_stack(X(), [[1.0]], scale=0.5, backend=b), TypeError, r"weight"),
    (
        "weight-int",
        lambda b: residual_stack(X(), t(3, 8, 8, dtype=INT), scale=0.5, backend=b),
        TypeError,
        r"weight.*floating",
    ),
    (
        "weight-complex",
        lambda b: residual_stack(X(), t(3, 8, 8, dtype=COMPLEX), scale=0.5, backend=b),
        TypeError,
        r"weight.*floating",
    ),
    (
        "x-wrong-width",
        lambda b: residual_stack(t(4, 7), W(), scale=0.5, backend=b),
        ValueError,
        r"\bx\b.*\(\.\.\., 8\)",
    ),
    (
        "x-0-dim",
        lambda b: residual_stack(torch.tensor(1.0), W(), scale=0.5, backend=b),
        ValueError,
        r"\bx\b.*\(\.\.\., 8\)",
    ),
    ("x-int", lambda b: residual_stack(t(4, 8, dtype=INT), W(), scale=0.5, backend=b), TypeError, r"\bx\b.*floating"),
    (
        "x-complex",
        lambda b: residual_stack(t(4, 8, dtype=COMPLEX), W(), scale=0.5, backend=b),
        TypeError,
        r"\bx\b.*floating",
    ),
    ("x-not-tensor", lambda b: residual_stack("x", W(), scale=0.5, backend=b), TypeError, r"\bx\b"),
    (
        "weight-dtype",
        lambda b: residual_stack(X(), t(3, 8, 8, dtype=torch.float64), scale=0.5, backend=b),
        TypeError,
        r"weight.*dtype.*float32",
    ),
    (
        "x-half-weight-float",
        lambda b: residual_stack(t(4, 8, dtype=torch.bfloat16), W(), scale=0.5, backend=b),
        TypeError,
        r"weight.*dtype of x \(torch\.bfloat16\)",
    ),
    (
        "weight-on-meta",
        lambda b: residual_stack(X(), t(3, 8, 8, device="meta"), scale=0.5, backend=b),
        ValueError,
        r"weight.*device",
    ),
    (
        "x-on-meta",
        lambda b: residual_stack(t(4, 8, device="meta"), W(), scale=0.5, backend=b),
        ValueError,
        r"weight.*device of x \(meta\)",
    ),
    (
        "bias-on-meta",
        lambda b: residual_stack(X(), W(), t(3, 8, device="meta"), scale=0.5, backend=b),
        ValueError,
        r"bias.*device",
    ),
    ("bias-shape", lambda b: residual_stack(X(), W(), t(3, 7), scale=0.5, backend=b), ValueError, r"bias.*\(3, 8\)"),
    ("bias-1d", lambda b: residual_stack(X(), W(), t(8), scale=0.5, backend=b), ValueError, r"bias.*\(3, 8\)"),
    ("bias-3d", lambda b: residual_stack(X(), W(), t(1, 3, 8), scale=0.5, backend=b), ValueError, r"bias.*\(3, 8\)"),
    (
        "bias-dtype",
        lambda b: residual_stack(X(), W(), t(3, 8, dtype=torch.float64), scale=0.5, backend=b),
        TypeError,
        r"bias.*dtype",
    ),
    ("bias-not-tensor", lambda b: residual_stack(X(), W(), 0.0, scale=0.5, backend=b), TypeError, r"bias"),
    ("scale-nan", lambda b: residual_stack(X(), W(), scale=math.nan, backend=b), ValueError, r"scale.*finite"),
    ("scale-inf", lambda b: residual_stack(X(), W(), scale=math.inf, backend=b), ValueError, r"scale.*finite"),
    (
        "scale-tensor",
        lambda b: residual_stack(X(), W(), scale=torch.tensor(0.5), backend=b),
        TypeError,
        r"scale.*real number",
    ),
    (
        "activation",
        lambda b: residual_stack(X(), W(), scale=0.5, activation="elu", backend=b),
        ValueError,
        r"activation.*'elu'",
    ),
    (
        "block",
        lambda b: residual_stack(X(), W(), scale=0.5, block="mid", backend=b),
        ValueError,
        r"block.*'post'.*'mid'",
    ),
    (
        "mean_subtract",
        lambda b: residual_stack(X(), W(), scale=0.5, mean_subtract=1, backend=b),
        TypeError,
        r"mean_subtract",
    ),
    (
        "return_states",
        lambda b: residual_stack(X(), W(), scale=0.5, return_states="yes", backend=b),
        TypeError,
        r"return_states.*bool",
    ),
]

MLP_STACK_CASES = [
    ("weight1-2d", lambda b: residual_mlp_stack(X(), t(5, 8), W2(), scale=0.5, backend=b), ValueError,
     r"weight1.*\(depth, hidden_width, width\)"),
    ("weight1-depth-0", lambda b: residual_mlp_stack(X(), t(0, 5, 8), t(0, 8, 5), scale=0.5, backend=b), ValueError,
     r"weight1.*depth >= 1"),
    ("hidden-width-0", lambda b: residual_mlp_stack(X(), t(3, 0, 8), t(3, 8, 0), scale=0.5, backend=b), ValueError,
     r"weight1.*hidden width.*>= 1.*\(3, 0, 8\)"),
    ("weight2-disagrees", lambda b: residual_mlp_stack(X(), W1(), t(3, 8, 6), scale=0.5, backend=b), ValueError,
     r"weight2.*\(3, 8, 5\).*weight1 \(3, 5, 8\).*\(3, 8, 6\)"),
    ("weight2-depth", lambda b: residual_mlp_stack(X(), W1(), t(2, 8, 5), scale=0.5, backend=b), ValueError,
     r"weight2.*\(3, 8, 5\)"),
    ("weight2-transposed", lambda b: residual_mlp_stack(X(), W1(), t(3, 5, 8), scale=0.5, backend=b), ValueError,
     r"weight2.*\(depth, width, hidden_width\)"),
    ("weight1-not-tensor", lambda b: residual_mlp_stack(X(), [[1.0]], W2(), scale=0.5, backend=b), TypeError,
     r"weight1.*Tensor"),
    ("weight2-int", lambda b: residual_mlp_stack(X(), W1(), t(3, 8, 5, dtype=INT), scale=0.5, backend=b), TypeError,
     r"weight2.*floating"),
    ("x-wrong-width", lambda b: residual_mlp_stack(t(4, 5), W1(), W2(), scale=0.5, backend=b), ValueError,
     r"\bx\b.*\(\.\.\., 8\)"),
    ("x-int", lambda b: residual_mlp_stack(t(4, 8, dtype=INT), W1(), W2(), scale=0.5, backend=b), TypeError,
     r"\bx\b.*floating"),
    ("weight1-dtype", lambda b: residual_mlp_stack(X(), W1().double(), W2(), scale=0.5, backend=b), TypeError,
     r"weight1.*dtype of x \(torch\.float32\).*float64"),
    ("weight2-dtype", lambda b: residual_mlp_stack(X(), W1(), W2().double(), scale=0.5, backend=b), TypeError,
     r"weight2.*dtype of x \(torch\.float32\).*float64"),
    ("x-half", lambda b: residual_mlp_stack(t(4, 8, dtype=torch.bfloat16), W1(), W2(), scale=0.5, backend=b),
     TypeError, r"weight1.*dtype of x \(torch\.bfloat16\)"),
    ("weight2-on-meta", lambda b: residual_mlp_stack(X(), W1(), t(3, 8, 5, device="meta"), scale=0.5, backend=b),
     ValueError, r"weight2.*device of x \(cpu\)"),
    ("x-on-meta", lambda b: residual_mlp_stack(t(4, 8, device="meta"), W1(), W2(), scale=0.5, backend=b), ValueError,
     r"weight1.*device of x \(meta\)"),
    ("bias1-shape", lambda b: residual_mlp_stack(X(), W1(), W2(), t(3, 8), scale=0.5, backend=b), ValueError,
     r"bias1.*\(3, 5\).*\(3, 8\)"),
    ("bias2-shape", lambda b: residual_mlp_stack(X(), W1(), W2(), t(3, 5), t(3, 5), scale=0.5, backend=b), ValueError,
     r"bias2.*\(3, 8\).*\(3, 5\)"),
    ("bias1-dtype", lambda b: residual_mlp_stack(X(), W1(), W2(), t(3, 5).double(), scale=0.5, backend=b), TypeError,
     r"bias1.*dtype"),
    ("bias2-on-meta", lambda b: residual_mlp_stack(X(), W1(), W2(), None, t(3, 8, device="meta"), scale=0.5,
                                                   backend=b), ValueError, r"bias2.*device"),
    ("bias2-not-tensor", lambda b: residual_mlp_stack(X(), W1(), W2(), None, 0.0, scale=0.5, backend=b), TypeError,
     r"bias2"),
    ("scale-nan", lambda b: residual_mlp_stack(X(), W1(), W2(), scale=math.nan, backend=b), ValueError,
     r"scale.*finite"),
    ("activation", lambda b: residual_mlp_stack(X(), W1(), W2(), scale=0.5, activation="elu", backend=b), ValueError,
     r"activation.*'elu'"),
    ("mean_subtract", lambda b: residual_mlp_stack(X(), W1(), W2(), scale=0.5, mean_subtract=0, backend=b), TypeError,
     r"mean_subtract.*bool"),
    ("checkpoint", lambda b: residual_mlp_stack(X(), W1(), W2(), scale=0.5, checkpoint=0, backend=b), ValueError,
     r"checkpoint must be None"),
    ("return_states", lambda b: residual_mlp_stack(X(), W1(), W2(), scale=0.5, return_states=1, backend=b), TypeError,
     r"return_states.*bool"),
    ("mlp-module-hidden-0", lambda b: ResidualMLPStack(8, 0, 3, backend=b), ValueError, r"hidden_width.*>= 1"),
    ("mlp-module-width-float", lambda b: ResidualMLPStack(8.0, 5, 3, backend=b), TypeError, r"width"),
    ("mlp-module-depth-0", lambda b: ResidualMLPStack(8, 5, 0, backend=b), ValueError, r"depth.*>= 1"),
    ("mlp-module-activation", lambda b: ResidualMLPStack(8, 5, 3, activation="tanh", backend=b), ValueError,
     r"activation.*'tanh'"),
    ("mlp-module-checkpoint", lambda b: ResidualMLPStack(8, 5, 3, checkpoint="log", backend=b), TypeError,
     r"checkpoint"),
    ("mlp-module-total-depth", lambda b: ResidualMLPStack(8, 5, 3, total_depth=2, backend=b), ValueError,
     r"total_depth must be >= depth \(3\)"),
    ("mlp-module-x-width", lambda b: ResidualMLPStack(8, 5, 2, backend=b)(t(3, 5)), ValueError,
     r"\bx\b.*\(\.\.\., 8\).*\(3, 5\)"),
    ("mlp-module-x-dtype", lambda b: ResidualMLPStack(8, 5, 2, backend=b)(t(3, 8, dtype=torch.float64)), TypeError,
     r"\bx\b.*dtype of weight1 \(torch\.float32\)"),
    ("mlp-net-hidden-0", lambda b: DepthMuPNet(3, 8, 2, 2, hidden_width=0, backend=b), ValueError,
     r"hidden_width.*>= 1"),
]  # fmt: skip

OVERFLOWING = DepthParametrization(alpha=200.0, gamma=0.0, base_depth=10**6)  # (1e-6) ** -200 is not a float

MODULE_CASES = [
    ("stack-width-0", lambda b: ResidualStack(0, 4, backend=b), ValueError, r"width.*>= 1"),
    ("stack-width-neg", lambda b: ResidualStack(-8, 4, backend=b), ValueError, r"width.*>= 1"),
    ("stack-width-float", lambda b: ResidualStack(8.0, 4, backend=b), TypeError, r"width"),
    ("stack-depth-0", lambda b: ResidualStack(8, 0, backend=b), ValueError, r"depth.*>= 1"),
    ("stack-depth-neg", lambda b: ResidualStack(8, -1, backend=b), ValueError, r"depth.*>= 1"),
    ("stack-depth-str", lambda b: ResidualStack(8, "4", backend=b), TypeError, r"depth"),
    (
        "stack-activation",
        lambda b: ResidualStack(8, 4, activation="softplus", backend=b),
        ValueError,
        r"activation.*'softplus'",
    ),
    ("stack-block", lambda b: ResidualStack(8, 4, block="middle", backend=b), ValueError, r"block.*'pre'"),
    (
        "stack-parametrization",
        lambda b: ResidualStack(8, 4, parametrization=(0.5, 0.5), backend=b),
        TypeError,
        r"parametrization.*DepthParametrization",
    ),
    ("stack-bias-flag", lambda b: ResidualStack(8, 4, bias="yes", backend=b), TypeError, r"bias.*bool"),
    ("stack-ms-flag", lambda b: ResidualStack(8, 4, mean_subtract=None, backend=b), TypeError, r"mean_subtract.*bool"),
    (
        "stack-dtype-int",
        lambda b: ResidualStack(8, 4, dtype=INT, backend=b),
        TypeError,
        r"dtype.*floating-point.*int64",
    ),
    ("stack-x-width", lambda b: ResidualStack(8, 2, backend=b)(t(3, 9)), ValueError, r"\bx\b.*\(\.\.\., 8\).*\(3, 9\)"),
    ("stack-x-0-dim", lambda b: ResidualStack(8, 2, backend=b)(torch.tensor(1.0)), ValueError, r"\bx\b.*\(\.\.\., 8\)"),
    ("stack-x-int", lambda b: ResidualStack(8, 2, backend=b)(t(3, 8, dtype=INT)), TypeError, r"\bx\b.*floating"),
    (
        "stack-x-complex",
        lambda b: ResidualStack(8, 2, backend=b)(t(3, 8, dtype=COMPLEX)),
        TypeError,
        r"\bx\b.*floating",
    ),
    (
        "stack-x-dtype",
        lambda b: ResidualStack(8, 2, backend=b)(t(3, 8, dtype=torch.float64)),
        TypeError,
        r"\bx\b.*dtype of weight \(torch\.float32\).*float64",
    ),
    (
        "stack-x-on-meta",
        lambda b: ResidualStack(8, 2, backend=b)(t(3, 8, device="meta")),
        ValueError,
        r"\bx\b.*device of weight \(cpu\).*meta",
    ),
    ("stack-x-list", lambda b: ResidualStack(8, 2, backend=b)([1.0] * 8), TypeError, r"\bx\b.*Tensor"),
    ("stack-x-none", lambda b: ResidualStack(8, 2, backend=b)(None), TypeError, r"\bx\b.*Tensor"),
    (
        "stack-return-states-flag",
        lambda b: ResidualStack(8, 2, backend=b)(t(3, 8), return_states=1),
        TypeError,
        r"return_states.*bool",
    ),
    (
        "stack-scale-overflow",
        lambda b: ResidualStack(8, 1, parametrization=OVERFLOWING, backend=b)(t(3, 8)),
        ValueError,
        r"branch_scale.*not finite",
    ),
    ("net-depth-0", lambda b: DepthMuPNet(3, 8, 0, 2, backend=b), ValueError, r"depth.*>= 1"),
    ("net-in-0", lambda b: DepthMuPNet(0, 8, 2, 2, backend=b), ValueError, r"in_features.*>= 1"),
    ("net-out-0", lambda b: DepthMuPNet(3, 8, 2, 0, backend=b), ValueError, r"out_features.*>= 1"),
    ("net-width-0", lambda b: DepthMuPNet(3, 0, 2, 2, backend=b), ValueError, r"width.*>= 1"),
    ("net-width-neg", lambda b: DepthMuPNet(3, -4, 2, 2, backend=b), ValueError, r"width.*>= 1"),
    ("net-width-float", lambda b: DepthMuPNet(3, 8.0, 2, 2, backend=b), TypeError, r"width"),
    (
        "net-readout-flag",
        lambda b: DepthMuPNet(3, 8, 2, 2, readout_zero_init=1, backend=b),
        TypeError,
        r"readout_zero_init",
    ),
    ("net-activation", lambda b: DepthMuPNet(3, 8, 2, 2, activation="tanh", backend=b), ValueError, r"activation"),
    (
        "net-activation-array",
        lambda b: DepthMuPNet(3, 8, 2, 2, activation=np.array(["relu"]), backend=b),
        TypeError,
        r"activation must be a str, one of .*; got ndarray",
    ),
    (
        "net-checkpoint-array",
        lambda b: DepthMuPNet(3, 8, 2, 2, checkpoint=np.array([2, 3]), backend=b),
        TypeError,
        r"checkpoint must be None, an int >= 1 or \"sqrt\"; got ndarray",
    ),
    ("net-dtype-int", lambda b: DepthMuPNet(3, 8, 2, 2, dtype=torch.int64, backend=b), TypeError, r"dtype.*floating"),
    ("net-unknown-option", lambda b: DepthMuPNet(3, 8, 2, 2, activaton="relu", backend=b), TypeError, r"activaton"),
    (
        "net-x-width",
        lambda b: DepthMuPNet(3, 8, 2, 2, backend=b)(t(4, 8)),
        ValueError,
        r"\bx\b.*\(\.\.\., 3\).*in_features.*\(4, 8\)",
    ),
    (
        "net-x-dtype",
        lambda b: DepthMuPNet(3, 8, 2, 2, backend=b)(t(4, 3, dtype=torch.float64)),
        TypeError,
        r"\bx\b.*dtype.*float32",
    ),
    (
        "net-x-on-meta",
        lambda b: DepthMuPNet(3, 8, 2, 2, backend=b)(t(4, 3, device="meta")),
        ValueError,
        r"\bx\b.*device",
    ),
    ("residual-branch", lambda b: ScaledResidual(lambda x: x, 0.5, backend=b), TypeError, r"branch.*nn\.Module"),
    ("residual-scale-nan", lambda b: ScaledResidual(nn.Identity(), math.nan, backend=b), ValueError, r"scale.*finite"),
    ("residual-scale-inf", lambda b: ScaledResidual(nn.Identity(), math.inf, backend=b), ValueError, r"scale.*finite"),
    (
        "residual-activation",
        lambda b: ScaledResidual(nn.Identity(), 0.5, "sigmoid", backend=b),
        ValueError,
        r"activation",
    ),
    (
        "residual-ms-flag",
        lambda b: ScaledResidual(nn.Identity(), 0.5, mean_subtract="no", backend=b),
        TypeError,
        r"mean_subtract.*bool",
    ),
    (
        "residual-branch-shape",
        lambda b: ScaledResidual(nn.Linear(8, 4), 0.5, backend=b)(t(2, 8)),
        ValueError,
        r"branch_out.*shape.*\(2, 8\)",
    ),
    (
        "residual-x-list",
        lambda b: ScaledResidual(nn.Linear(8, 8), 0.5, backend=b)([1.0] * 8),
        TypeError,
        r"\bx\b.*Tensor",
    ),
    (
        "residual-x-int",
        lambda b: ScaledResidual(nn.Identity(), 0.5, backend=b)(t(2, 8, dtype=INT)),
        TypeError,
        r"\bx\b.*floating",
    ),
]


def make_net(depth: int) -> DepthMuPNet:
    return DepthMuPNet(3, 8, depth, 2)


DATA = (torch.randn(6, 3), torch.randint(0, 2, (6,)))

# Arguments that do not reach a backend: backend names, optimizer groups, parametrizations, diagnostics.
BACKEND_FREE_CASES = [
    (
        "scaled-residual-backend",
        lambda: scaled_residual(X(), X(), 0.5, backend="fortran"),
        ValueError,
        r"backend.*'cpp'.*'fortran'",
    ),
    ("stack-backend", lambda: residual_stack(X(), W(), scale=0.5, backend="numba"), ValueError, r"backend.*'numba'"),
    ("stack-module-backend", lambda: ResidualStack(8, 4, backend="opencl"), ValueError, r"backend.*'reference'"),
    ("residual-module-backend", lambda: ScaledResidual(nn.Identity(), 0.5, backend="gpu"), ValueError, r"backend"),
    (
        "cpp-on-meta",
        lambda: scaled_residual(t(2, 3, device="meta"), t(2, 3, device="meta"), 0.5, backend="cpp"),
        (ValueError, RuntimeError),
        r"cpp",
    ),
    ("groups-model", lambda: param_groups([nn.Linear(2, 2)], 1e-3), TypeError, r"model.*nn\.Module.*list"),
    ("groups-lr-nan", lambda: param_groups(nn.Linear(2, 2), math.nan), ValueError, r"lr.*finite"),
    ("groups-lr-negative", lambda: param_groups(nn.Linear(2, 2), -1e-3), ValueError, r"lr.*>= 0"),
    ("groups-lr-str", lambda: param_groups(nn.Linear(2, 2), "1e-3"), TypeError, r"lr.*real number"),
    (
        "groups-weight-decay",
        lambda: param_groups(nn.Linear(2, 2), 1e-3, weight_decay=-0.1),
        ValueError,
        r"weight_decay.*>= 0",
    ),
    ("branch-scale-overflow", lambda: OVERFLOWING.branch_scale(1), ValueError, r"branch_scale at depth 1.*not finite"),
    (
        "branch-scale-huge-depth",
        lambda: DepthParametrization(0.5, 0.5).branch_scale(10**400),
        ValueError,
        r"branch_scale at depth 1000.*",
    ),
    (
        "multiplier-huge-int",
        lambda: DepthParametrization(0.5, 0.5, multiplier=10**400),
        ValueError,
        r"multiplier must be finite as a float; got an int of 401 digits",
    ),
    (
        "lr-scale-overflow",
        lambda: DepthParametrization(0.0, 400.0, base_depth=10**6).lr_scale(1),
        ValueError,
        r"lr_scale at depth 1.*not finite",
    ),
    ("diversity-int", lambda: dg.feature_diversity(torch.ones(9, 4, dtype=INT)), TypeError, r"stream.*floating"),
    (
        "diversity-list-shapes",
        lambda: dg.feature_diversity([t(4), t(4), t(5)]),
        ValueError,
        r"stream\[2\].*shape \(4,\)",
    ),
    ("diversity-list-item", lambda: dg.feature_diversity([t(4), [1.0] * 4, t(4)]), TypeError, r"stream\[1\].*Tensor"),
    (
        "diversity-list-dtype",
        lambda: dg.feature_diversity([t(4), t(4, dtype=torch.float64), t(4)]),
        TypeError,
        r"stream\[1\].*dtype",
    ),
    ("diversity-lam-str", lambda: dg.feature_diversity(t(9, 4), lam="0.5"), TypeError, r"lam.*real number"),
    ("diversity-lam-nan", lambda: dg.feature_diversity(t(9, 4), lam=math.nan), ValueError, r"lam.*finite"),
    ("diversity-eps-str", lambda: dg.feature_diversity(t(9, 4), eps=[0.25, "a"]), TypeError, r"eps\[1\]"),
    ("diversity-one-eps", lambda: dg.feature_diversity(t(9, 4), eps=[0.25, 0.25]), ValueError, r"eps.*2 distinct"),
    ("diversity-few-states", lambda: dg.feature_diversity(t(3, 4)), ValueError, r"2 distinct.*L = 2 and lam = 0.5"),
    ("cka-complex", lambda: dg.cka(t(5, 3, dtype=COMPLEX), t(5, 3)), TypeError, r"\bA\b.*floating"),
    ("cknna-int", lambda: dg.cknna(t(5, 3), t(5, 3, dtype=INT), k=2), TypeError, r"\bB\b.*floating"),
    ("knn-k-float", lambda: dg.mutual_knn(t(5, 3), t(5, 3), k=2.0), TypeError, r"\bk\b.*int"),
    ("knn-k-0", lambda: dg.mutual_knn(t(5, 3), t(5, 3), k=0), ValueError, r"\bk\b.*>= 1"),
    ("coord-model", lambda: dg.coord_check("net", [2], DATA, lr=1e-3), TypeError, r"make_model.*callable"),
    ("coord-depth", lambda: dg.coord_check(make_net, [2, 0], DATA, lr=1e-3), ValueError, r"depth.*>= 1"),
    ("coord-data", lambda: dg.coord_check(make_net, [2], DATA[0], lr=1e-3), TypeError, r"data.*pair"),
    (
        "coord-model-parts",
        lambda: dg.coord_check(lambda depth: nn.Linear(3, 3), [2], DATA, lr=1e-3),
        TypeError,
        r"Linear has no input, stack, readout \(or output\)",
    ),
    (
        "coord-inputs-int",
        lambda: dg.coord_check(make_net, [2], (DATA[1], DATA[1]), lr=1e-3),
        TypeError,
        r"inputs.*floating",
    ),
    (
        "coord-samples",
        lambda: dg.coord_check(make_net, [2], (DATA[0], DATA[1][:5]), lr=1e-3),
        ValueError,
        r"same number of samples.*\(6, 3\).*\(5,\)",
    ),
    (
        "coord-optimizer",
        lambda: dg.coord_check(make_net, [2], DATA, optimizer="lbfgs", lr=1e-3),
        ValueError,
        r"optimizer.*'lbfgs'",
    ),
    ("coord-lr", lambda: dg.coord_check(make_net, [2], DATA, lr=math.nan), ValueError, r"lr.*finite"),
    ("coord-steps", lambda: dg.coord_check(make_net, [2], DATA, steps=0, lr=1e-3), ValueError, r"steps.*>= 1"),
]


def _ids(cases):
    return [case[0] for case in cases]


def _params(cases):
    return [case[1:] for case in cases]


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("call,error,match", _params(SCALED_RESIDUAL_CASES), ids=_ids(SCALED_RESIDUAL_CASES))
def test_scaled_residual_bad_input(call, error, match, backend):
    with pytest.raises(error, match=match):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("call,error,match", _params(STACK_CASES), ids=_ids(STACK_CASES))
def test_residual_stack_bad_input(call, error, match, backend):
    with pytest.raises(error, match=match):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("call,error,match", _params(MLP_STACK_CASES), ids=_ids(MLP_STACK_CASES))
def test_residual_mlp_stack_bad_input(call, error, match, backend):
    with pytest.raises(error, match=match):
        call(backend)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("call,error,match", _params(MODULE_CASES), ids=_ids(MODULE_CASES))
def test_module_bad_input(call, error, match, backend):
    with pytest.raises(error, match=match):
        call(backend)


@pytest.mark.parametrize("call,error,match", _params(BACKEND_FREE_CASES), ids=_ids(BACKEND_FREE_CASES))
def test_backend_free_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# empty batch: an empty result and zero parameter gradients, as torch gives
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=["0x8", "2x0x8"])
def test_empty_batch_functions(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    branch_out = torch.randn(shape, requires_grad=True)
    out = scaled_residual(x, branch_out, 0.5, "abs", True, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape and branch_out.grad.shape == shape

    x.grad = None
    weight = torch.randn(3, 8, 8, requires_grad=True)
    bias = torch.randn(3, 8, requires_grad=True)
    out, states = residual_stack(x, weight, bias, scale=0.5, activation="relu", backend=backend, return_states=True)
    assert out.shape == shape and states.shape == (4, *shape)
    out.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_empty_batch_modules(backend):
    modules = [
        ResidualStack(8, 3, bias=True, backend=backend),
        ScaledResidual(nn.Linear(8, 8), 0.5, "gelu", True, backend=backend),
        DepthMuPNet(8, 16, 3, 8, activation="abs", backend=backend),
    ]
    for module in modules:
        x = torch.randn(0, 8, requires_grad=True)
        out = module(x)
        assert out.shape == (0, 8), type(module).__name__
        out.sum().backward()
        assert x.grad.shape == (0, 8)
        for name, param in module.named_parameters():
            assert torch.equal(param.grad, torch.zeros_like(param)), f"{type(module).__name__}.{name}"


# ---------------------------------------------------------------------------------------------------
# the registered op called directly: C++ TORCH_CHECK_VALUE -> ValueError, never a crash
# ---------------------------------------------------------------------------------------------------

OP_CASES = [
    ("shape", lambda op: op(t(4, 8), t(4, 7), 0.5, "relu", True), r"branch_out.*shape of x"),
    ("rows", lambda op: op(t(4, 8), t(3, 8), 0.5, "relu", False), r"branch_out.*shape of x"),
    ("rank", lambda op: op(t(4, 8), t(32), 0.5, "identity", False), r"branch_out.*shape of x"),
    ("dtype", lambda op: op(t(4, 8), t(4, 8, dtype=torch.float64), 0.5, "relu", True), r"branch_out.*dtype"),
    ("activation", lambda op: op(t(4, 8), t(4, 8), 0.5, "tanh", True), r"activation.*'tanh'"),
    ("0-dim", lambda op: op(torch.tensor(1.0), torch.tensor(2.0), 0.5, "relu", True), r"\bx\b.*dimension"),
]


@needs_cpp
@pytest.mark.parametrize("call,match", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op_direct_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.ops.dmup.scaled_residual)


@needs_cpp
def test_backward_op_direct_bad_input():
    op = torch.ops.dmup.scaled_residual_backward
    with pytest.raises(ValueError, match=r"grad_out.*shape"):
        op(t(4, 7), t(4, 8), 0.5, "relu", True)
    with pytest.raises(ValueError, match=r"grad_out.*dtype"):
        op(t(4, 8, dtype=torch.float64), t(4, 8), 0.5, "relu", True)
    with pytest.raises(ValueError, match="activation"):
        op(t(4, 8), t(4, 8), 0.5, "swish", True)


@needs_cpp
def test_op_direct_integer_dtype():
    """Integer tensors reach the C++ ops when they are called directly: an error naming the argument."""
    with pytest.raises(TypeError, match=r"\bx must be float32, float64, float16 or bfloat16; got Long"):
        torch.ops.dmup.scaled_residual(t(4, 8, dtype=INT), t(4, 8, dtype=INT), 0.5, "relu", True)
    with pytest.raises(TypeError, match=r"branch_out must be float32, .*; got Long"):
        torch.ops.dmup.scaled_residual_backward(t(4, 8), t(4, 8, dtype=INT), 0.5, "relu", True)


META = "meta"


def meta_mlp_backward(grad_width: int = 8, mask_dtype: torch.dtype = torch.int16):
    """The MLP backward op on meta tensors of a relu forward with n = 8, m = 5, B = 3, L = 2."""
    return torch.ops.dmup.residual_mlp_stack_backward(
        t(3, grad_width, device=META), t(2, 8, 3, device=META), t(2, 1, 5, 1, dtype=mask_dtype, device=META),
        t(2, 5, 8, device=META), t(2, 8, 5, device=META), None, None, 0.5, "relu", True,
    )  # fmt: skip


FAKE_RULE_CASES = [
    (
        "stack-weight-shape",
        lambda: torch.ops.dmup.residual_stack(t(3, 8, device=META), t(2, 5, 7, device=META), None, 0.5, "relu", "post",
                                              True, True),
        ValueError,
        r"weight must have shape \(depth, width, width\)",
    ),
    (
        "stack-mixed-devices",
        lambda: torch.ops.dmup.residual_stack(t(3, 8), t(2, 8, 8, device=META), None, 0.5, "relu", "post", True, True),
        ValueError,
        r"weight must be on the device of x \(cpu\); got meta",
    ),
    (
        "stack-checkpoint-every",
        lambda: torch.ops.dmup.residual_stack(t(3, 8, device=META), t(2, 8, 8, device=META), None, 0.5, "relu", "post",
                                              True, True, -2),
        ValueError,
        r"checkpoint_every must be 0 \(save every layer\) or >= 1; got -2",
    ),
    (
        "stack-backward-saved",
        lambda: torch.ops.dmup.residual_stack_backward(t(3, 8, device=META), t(5, device=META),
                                                       t(2, 1, 8, 1, dtype=torch.int16, device=META),
                                                       t(2, 8, 8, device=META), None, 0.5, "relu", "post", True),
        ValueError,
        r"saved \(returned by residual_stack\) must have shape \(2, 8, 3\); got \(5,\)",
    ),
    (
        "mlp-backward-grad-out",
        lambda: meta_mlp_backward(grad_width=6),
        ValueError,
        r"grad_out must have shape \(\.\.\., 8\)",
    ),
    (
        "mlp-backward-mask-dtype",
        lambda: meta_mlp_backward(mask_dtype=torch.int32),
        TypeError,
        r"mask must be torch.int16; got torch.int32",
    ),
    (
        "epilogue-mixed-devices",
        lambda: torch.ops.dmup.scaled_residual(t(3, 4), t(3, 4, device=META), 0.5, "relu", True),
        ValueError,
        r"dmup::scaled_residual: its two tensors must be on one device",
    ),
]  # fmt: skip


@needs_cpp
@pytest.mark.parametrize("call,error,match", [c[1:] for c in FAKE_RULE_CASES], ids=[c[0] for c in FAKE_RULE_CASES])
def test_fake_rules_check_what_the_kernels_check(call, error, match):
    """Meta tensors (and torch.compile) run the ops' fake rules only: they reject what the C++ ops reject, and
    a CPU tensor beside a meta one gets an error rather than an unfilled CPU result."""
    with pytest.raises(error, match=match):
        call()


def op_call(name: str, *, scale: float = 0.5, rows: tuple[int, ...] = (3, 8), dtype=torch.float32, param_dtype=None):
    """A call of the C++ op ``name`` with relu, B = 3, n = 8, m = 5, L = 2, on valid arguments but for ``scale``,
    and x (grad_out in a backward) of shape ``rows`` and ``dtype`` (the parameters' ``param_dtype``, x's by
    default); its tensors are made when it is called, so that it runs as well in a FakeTensorMode."""
    ops, param_dtype = torch.ops.dmup, param_dtype or dtype

    def call():
        x, p = t(*rows, dtype=dtype), lambda *shape: t(*shape, dtype=param_dtype)
        mask = lambda features: torch.zeros(2, 1, features, 1, dtype=torch.int16)  # noqa: E731
        return {
            "scaled_residual": lambda: ops.scaled_residual(x, t(*rows, dtype=dtype), scale, "relu", True),
            "scaled_residual_backward": lambda: ops.scaled_residual_backward(
                x, t(*rows, dtype=dtype), scale, "relu", True
            ),
            "residual_stack": lambda: ops.residual_stack(x, p(2, 8, 8), p(2, 8), scale, "relu", "post", True, True),
            "residual_stack_backward": lambda: ops.residual_stack_backward(
                x, p(2, 8, 3), mask(8), p(2, 8, 8), p(2, 8), scale, "relu", "post", True
            ),
            "residual_mlp_stack": lambda: ops.residual_mlp_stack(
                x, p(2, 5, 8), p(2, 8, 5), p(2, 5), p(2, 8), scale, "relu", True, True
            ),
            "residual_mlp_stack_backward": lambda: ops.residual_mlp_stack_backward(
                x, p(2, 8, 3), mask(5), p(2, 5, 8), p(2, 8, 5), p(2, 5), p(2, 8), scale, "relu", True
            ),
        }[name]()

    return call


STACK_OPS = ["residual_stack", "residual_stack_backward", "residual_mlp_stack", "residual_mlp_stack_backward"]
ALL_OPS = ["scaled_residual", "scaled_residual_backward", *STACK_OPS]

# (id, ops, call(op), exception, regex the message must match); the stack ops take rows (B, n) of float32 or
# float64, which the functions make (of any (..., n), and under autocast of any floating dtype) before calling them
KERNEL_AND_FAKE_CASES = [
    ("scale-nan", ALL_OPS, lambda op: op_call(op, scale=math.nan), ValueError, r"scale must be finite; got nan"),
    ("scale-inf", ALL_OPS, lambda op: op_call(op, scale=-math.inf), ValueError, r"scale must be finite; got -inf"),
    ("rows-3d", STACK_OPS, lambda op: op_call(op, rows=(1, 3, 8)), ValueError, r"(x|grad_out) must be 2-D"),
    ("rows-bf16", STACK_OPS, lambda op: op_call(op, dtype=torch.bfloat16), TypeError, r"must be float32 or float64"),
    (
        "rows-bf16-params-f32",
        STACK_OPS,
        lambda op: op_call(op, dtype=torch.bfloat16, param_dtype=torch.float32),
        TypeError,
        r"must be float32 or float64",
    ),
    (
        "params-f64",
        STACK_OPS,
        lambda op: op_call(op, param_dtype=torch.float64),
        TypeError,
        r"weight1? must have the dtype of (x|grad_out) \((torch\.float32|Float)\)",
    ),
]  # fmt: skip


@needs_cpp
@pytest.mark.parametrize("autocast", [False, True], ids=["", "autocast"])
@pytest.mark.parametrize(
    "op,call,error,match",
    [(op, *c[2:]) for c in KERNEL_AND_FAKE_CASES for op in c[1]],
    ids=[f"{c[0]}-{op}" for c in KERNEL_AND_FAKE_CASES for op in c[1]],
)
def test_fake_rules_reject_what_the_kernels_reject(op, call, error, match, autocast):
    """The same bad arguments raise the same error from the CPU kernel and from the fake rule (what
    torch.compile runs), also under autocast, where the functions accept mixed dtypes but the ops do not."""
    with torch.autocast("cpu", enabled=autocast):
        with pytest.raises(error, match=match):
            call(op)()
        with FakeTensorMode(), pytest.raises(error, match=match):
            call(op)()


@needs_cpp
def test_stack_backward_ops_name_grad_out():
    """The backward ops check grad_out as the forward checks x, under its own name."""
    weight, saved, mask = t(2, 4, 4), t(2, 4, 3), torch.zeros(2, 1, 4, 1, dtype=torch.int16)
    with pytest.raises(TypeError, match=r"weight must have the dtype of grad_out \(Double\)"):
        torch.ops.dmup.residual_stack_backward(t(3, 4, dtype=torch.float64), saved, mask, weight, None, 0.5, "relu",
                                               "post", True)  # fmt: skip
    with pytest.raises(ValueError, match=r"grad_out must be 2-D"):
        torch.ops.dmup.residual_mlp_stack_backward(t(3), saved, mask, t(2, 5, 4), t(2, 4, 5), None, None, 0.5, "relu",
                                                   True)  # fmt: skip
