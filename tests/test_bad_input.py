"""Bad input raises ValueError/TypeError whose message names the argument (and the expected value)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dmup_kernels
from dmup_kernels import DepthMuPNet, ResidualStack, ScaledResidual, residual_stack, scaled_residual

needs_cpp = pytest.mark.skipif(not dmup_kernels.HAS_CPP, reason="C++ extension not built")


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device) if dtype.is_floating_point else torch.ones(
        *shape, dtype=dtype
    )


X = lambda: t(4, 8)  # noqa: E731
W = lambda: t(3, 8, 8)  # noqa: E731

# (id, call, exception, regex the message must match)
SCALED_RESIDUAL_CASES = [
    ("x-not-tensor", lambda: scaled_residual([[1.0, 2.0]], X(), 0.5), TypeError, r"x must be a torch\.Tensor"),
    ("x-numpy", lambda: scaled_residual(X().numpy(), X(), 0.5), TypeError, r"\bx\b.*Tensor"),
    ("branch-not-tensor", lambda: scaled_residual(X(), 3.0, 0.5), TypeError, r"branch_out must be a torch\.Tensor"),
    ("x-int", lambda: scaled_residual(t(4, 8, dtype=torch.int64), X(), 0.5), TypeError, r"\bx\b.*floating"),
    ("branch-int", lambda: scaled_residual(X(), t(4, 8, dtype=torch.int32), 0.5), TypeError, r"branch_out.*floating"),
    ("x-bool", lambda: scaled_residual(t(4, 8, dtype=torch.bool), X(), 0.5), TypeError, r"\bx\b.*floating"),
    ("dtype-mismatch", lambda: scaled_residual(X(), t(4, 8, dtype=torch.float64), 0.5), TypeError,
     r"branch_out.*dtype.*float32"),
    ("shape-mismatch", lambda: scaled_residual(X(), t(4, 7), 0.5), ValueError, r"branch_out.*shape.*\(4, 8\)"),
    ("broadcast-shape", lambda: scaled_residual(X(), t(1, 8), 0.5), ValueError, r"branch_out.*shape.*\(4, 8\)"),
    ("device-mismatch", lambda: scaled_residual(X(), t(4, 8, device="meta"), 0.5), ValueError,
     r"branch_out.*device.*cpu"),
    ("0-dim", lambda: scaled_residual(torch.tensor(1.0), torch.tensor(2.0), 0.5), ValueError, r"\bx\b.*dim"),
    ("scale-nan", lambda: scaled_residual(X(), X(), math.nan), ValueError, r"scale.*finite"),
    ("scale-inf", lambda: scaled_residual(X(), X(), -math.inf), ValueError, r"scale.*finite"),
    ("scale-str", lambda: scaled_residual(X(), X(), "0.5"), TypeError, r"scale"),
    ("scale-none", lambda: scaled_residual(X(), X(), None), TypeError, r"scale"),
    ("activation", lambda: scaled_residual(X(), X(), 0.5, "tanh"), ValueError, r"activation.*'relu'.*'tanh'"),
    ("activation-case", lambda: scaled_residual(X(), X(), 0.5, "ReLU"), ValueError, r"activation"),
    ("mean_subtract", lambda: scaled_residual(X(), X(), 0.5, "relu", "yes"), TypeError, r"mean_subtract.*bool"),
    ("backend", lambda: scaled_residual(X(), X(), 0.5, backend="fortran"), ValueError,
     r"backend.*'cpp'.*'fortran'"),
    ("cpp-on-meta", lambda: scaled_residual(t(2, 3, device="meta"), t(2, 3, device="meta"), 0.5, backend="cpp"),
     (ValueError, RuntimeError), r"cpp"),
]

STACK_CASES = [
    ("weight-2d", lambda: residual_stack(X(), t(8, 8), scale=0.5), ValueError, r"weight.*\(depth, width, width\)"),
    ("weight-4d", lambda: residual_stack(X(), t(1, 3, 8, 8), scale=0.5), ValueError, r"weight.*shape"),
    ("weight-not-square", lambda: residual_stack(X(), t(3, 8, 7), scale=0.5), ValueError, r"weight.*shape"),
    ("weight-depth-0", lambda: residual_stack(X(), t(0, 8, 8), scale=0.5), ValueError, r"weight.*depth >= 1"),
    ("weight-not-tensor", lambda: residual_stack(X(), [[1.0]], scale=0.5), TypeError, r"weight"),
    ("weight-int", lambda: residual_stack(X(), t(3, 8, 8, dtype=torch.int64), scale=0.5), TypeError, r"weight"),
    ("x-wrong-width", lambda: residual_stack(t(4, 7), W(), scale=0.5), ValueError, r"\bx\b.*\(\.\.\., 8\)"),
    ("x-0-dim", lambda: residual_stack(torch.tensor(1.0), W(), scale=0.5), ValueError, r"\bx\b.*\(\.\.\., 8\)"),
    ("x-int", lambda: residual_stack(t(4, 8, dtype=torch.int64), W(), scale=0.5), TypeError, r"\bx\b.*floating"),
    ("x-not-tensor", lambda: residual_stack("x", W(), scale=0.5), TypeError, r"\bx\b"),
    ("weight-dtype", lambda: residual_stack(X(), t(3, 8, 8, dtype=torch.float64), scale=0.5), TypeError,
     r"weight.*dtype.*float32"),
    ("weight-device", lambda: residual_stack(X(), t(3, 8, 8, device="meta"), scale=0.5), ValueError,
     r"weight.*device"),
    ("bias-shape", lambda: residual_stack(X(), W(), t(3, 7), scale=0.5), ValueError, r"bias.*\(3, 8\)"),
    ("bias-1d", lambda: residual_stack(X(), W(), t(8), scale=0.5), ValueError, r"bias.*\(3, 8\)"),
    ("bias-dtype", lambda: residual_stack(X(), W(), t(3, 8, dtype=torch.float64), scale=0.5), TypeError,
     r"bias.*dtype"),
    ("bias-not-tensor", lambda: residual_stack(X(), W(), 0.0, scale=0.5), TypeError, r"bias"),
    ("scale-nan", lambda: residual_stack(X(), W(), scale=math.nan), ValueError, r"scale.*finite"),
    ("scale-inf", lambda: residual_stack(X(), W(), scale=math.inf), ValueError, r"scale.*finite"),
    ("activation", lambda: residual_stack(X(), W(), scale=0.5, activation="elu"), ValueError,
     r"activation.*'elu'"),
    ("block", lambda: residual_stack(X(), W(), scale=0.5, block="mid"), ValueError, r"block.*'post'.*'mid'"),
    ("backend", lambda: residual_stack(X(), W(), scale=0.5, backend="numba"), ValueError, r"backend.*'numba'"),
    ("mean_subtract", lambda: residual_stack(X(), W(), scale=0.5, mean_subtract=1), TypeError, r"mean_subtract"),
]

MODULE_CASES = [
    ("stack-width-0", lambda: ResidualStack(0, 4), ValueError, r"width.*>= 1"),
    ("stack-width-neg", lambda: ResidualStack(-8, 4), ValueError, r"width.*>= 1"),
    ("stack-width-float", lambda: ResidualStack(8.0, 4), TypeError, r"width"),
    ("stack-depth-0", lambda: ResidualStack(8, 0), ValueError, r"depth.*>= 1"),
    ("stack-depth-neg", lambda: ResidualStack(8, -1), ValueError, r"depth.*>= 1"),
    ("stack-depth-str", lambda: ResidualStack(8, "4"), TypeError, r"depth"),
    ("stack-activation", lambda: ResidualStack(8, 4, activation="softplus"), ValueError, r"activation.*'softplus'"),
    ("stack-block", lambda: ResidualStack(8, 4, block="middle"), ValueError, r"block.*'pre'"),
    ("stack-backend", lambda: ResidualStack(8, 4, backend="opencl"), ValueError, r"backend.*'reference'"),
    ("stack-parametrization", lambda: ResidualStack(8, 4, parametrization=(0.5, 0.5)), TypeError,
     r"parametrization.*DepthParametrization"),
    ("stack-bias-flag", lambda: ResidualStack(8, 4, bias="yes"), TypeError, r"bias.*bool"),
    ("stack-ms-flag", lambda: ResidualStack(8, 4, mean_subtract=None), TypeError, r"mean_subtract.*bool"),
    ("stack-x-width", lambda: ResidualStack(8, 2)(t(3, 9)), ValueError, r"\bx\b.*\(\.\.\., 8\).*\(3, 9\)"),
    ("stack-x-0-dim", lambda: ResidualStack(8, 2)(torch.tensor(1.0)), ValueError, r"\bx\b.*\(\.\.\., 8\)"),
    ("stack-x-int", lambda: ResidualStack(8, 2)(t(3, 8, dtype=torch.int64)), TypeError, r"\bx\b.*floating"),
    ("stack-x-dtype", lambda: ResidualStack(8, 2)(t(3, 8, dtype=torch.float64)), TypeError, r"dtype.*float64"),
    ("net-depth-0", lambda: DepthMuPNet(3, 8, 0, 2), ValueError, r"depth.*>= 1"),
    ("net-in-0", lambda: DepthMuPNet(0, 8, 2, 2), ValueError, r"in_features.*>= 1"),
    ("net-out-0", lambda: DepthMuPNet(3, 8, 2, 0), ValueError, r"out_features.*>= 1"),
    ("net-width-0", lambda: DepthMuPNet(3, 0, 2, 2), ValueError, r"width.*>= 1"),
    ("net-readout-flag", lambda: DepthMuPNet(3, 8, 2, 2, readout_zero_init=1), TypeError, r"readout_zero_init"),
    ("net-activation", lambda: DepthMuPNet(3, 8, 2, 2, activation="tanh"), ValueError, r"activation"),
    ("residual-branch", lambda: ScaledResidual(lambda x: x, 0.5), TypeError, r"branch.*nn\.Module"),
    ("residual-scale-nan", lambda: ScaledResidual(nn.Identity(), math.nan), ValueError, r"scale.*finite"),
    ("residual-scale-inf", lambda: ScaledResidual(nn.Identity(), math.inf), ValueError, r"scale.*finite"),
    ("residual-activation", lambda: ScaledResidual(nn.Identity(), 0.5, "sigmoid"), ValueError, r"activation"),
    ("residual-backend", lambda: ScaledResidual(nn.Identity(), 0.5, backend="gpu"), ValueError, r"backend"),
    ("residual-branch-shape", lambda: ScaledResidual(nn.Linear(8, 4), 0.5)(t(2, 8)), ValueError,
     r"branch_out.*shape.*\(2, 8\)"),
]


def _run(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("call,error,match", [c[1:] for c in SCALED_RESIDUAL_CASES], ids=[c[0] for c in SCALED_RESIDUAL_CASES])
def test_scaled_residual_bad_input(call, error, match):
    _run(call, error, match)


@pytest.mark.parametrize("call,error,match", [c[1:] for c in STACK_CASES], ids=[c[0] for c in STACK_CASES])
def test_residual_stack_bad_input(call, error, match):
    _run(call, error, match)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("call,error,match", [c[1:] for c in MODULE_CASES], ids=[c[0] for c in MODULE_CASES])
def test_module_bad_input(call, error, match):
    _run(call, error, match)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_input_is_caught_for_every_backend(backend):
    """Validation runs before dispatch, whichever backend is asked for."""
    if backend == "cpp" and not dmup_kernels.HAS_CPP:
        pytest.skip("C++ extension not built")
    with pytest.raises(ValueError, match=r"branch_out.*shape"):
        scaled_residual(X(), t(4, 9), 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"\bx\b.*\(\.\.\., 8\)"):
        residual_stack(t(4, 9), W(), scale=0.5, backend=backend)
    with pytest.raises(ValueError, match="activation"):
        ResidualStack(8, 2, activation="nope", backend=backend)


@pytest.mark.parametrize("value", [[1.0] * 8, 3.0, None], ids=["list", "float", "none"])
def test_stack_forward_non_tensor(value):
    with pytest.raises(TypeError, match=r"\bx\b.*Tensor"):
        ResidualStack(8, 2)(value)


def test_net_negative_width():
    with pytest.raises(ValueError, match=r"width.*>= 1"):
        DepthMuPNet(3, -4, 2, 2)


def test_net_float_width():
    with pytest.raises(TypeError, match=r"width"):
        DepthMuPNet(3, 8.0, 2, 2)


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
    """Integer tensors reach the C++ dispatch when the op is called directly: an error, not a crash."""
    with pytest.raises((TypeError, RuntimeError), match="Long|Int|dtype"):
        torch.ops.dmup.scaled_residual(t(4, 8, dtype=torch.int64), t(4, 8, dtype=torch.int64), 0.5, "relu", True)
