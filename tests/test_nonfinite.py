"""NaN and +-inf in the inputs, weights, biases or the incoming gradient propagate as in the eager reference:
no masking, no crash. The output and every gradient have NaN, +inf and -inf at exactly the positions of the
float64 reference's, and agree with it elsewhere (relative error below 1e-12 in float64, 1e-5 in float32), on
backends "reference", "cpp", "triton" (CPU tensors through the interpreter, CUDA tensors on a GPU) and "cuda"
(on a GPU, with the CUDA build).

torch's rules that the kernels follow: relu's backward is threshold_backward (0 where h <= 0, the incoming
gradient elsewhere, so also where h is NaN); abs's is g * sign(h) with sign(NaN) = 0; silu(-inf) and
gelu(-inf) are NaN (-inf * 0).
"""

from __future__ import annotations

import math

import pytest
import torch

import dmup_kernels
from dmup_kernels import reference

from conftest import backend_device, needs_cpp, needs_cuda, needs_triton, rel_err
from sample_inputs import (
    ACTIVATIONS,
    MlpStackSpec,
    ResidualSpec,
    StackSpec,
    make_mlp_stack_case,
    make_residual_case,
    make_stack_case,
)

pytestmark = [
    pytest.mark.usefixtures("nan_poison"),
    # numpy warns when the Triton interpreter computes with NaN and inf, which is what these tests do
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

# (backend, dtype): the "reference" backend in float64 would be the float64 reference itself
BACKEND_DTYPES = [
    pytest.param("cpp", torch.float64, marks=needs_cpp, id="cpp-f64"),
    pytest.param("cpp", torch.float32, marks=needs_cpp, id="cpp-f32"),
    pytest.param("reference", torch.float32, id="reference-f32"),
    pytest.param("triton", torch.float64, marks=needs_triton, id="triton-f64"),
    pytest.param("triton", torch.float32, marks=needs_triton, id="triton-f32"),
    pytest.param("cuda", torch.float64, marks=needs_cuda, id="cuda-f64"),
    pytest.param("cuda", torch.float32, marks=needs_cuda, id="cuda-f32"),
]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
NAN, INF = math.nan, math.inf

# Where the special values go, as (index, value) pairs. Rows are independent, so one case poisons the
# first three rows of one row-wise tensor and the next three of another; weight and bias poison
# features of the last layer, so that the first layer stays finite.
ROWS_0_TO_2 = [((0, 3), NAN), ((1, 5), INF), ((2, 7), -INF)]
ROWS_3_TO_5 = [((3, 0), -INF), ((4, 8), NAN), ((5, 2), INF)]
WEIGHT_POISON = [((1, 4, 6), NAN), ((1, 9, 2), INF), ((1, 0, 11), -INF)]
BIAS_POISON = [((1, 4), -INF), ((1, 9), NAN), ((1, 0), INF)]


def poison(tensor: torch.Tensor, entries) -> None:
    with torch.no_grad():
        for index, value in entries:
            tensor[index] = value


def assert_nonfinite_match(got: torch.Tensor, expected: torch.Tensor, name: str, tol: float) -> None:
    """NaN, +inf and -inf at the same positions; the finite rest within ``tol`` (relative)."""
    assert got.shape == expected.shape, name
    for kind, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = where(got) != where(expected)
        assert not differ.any(), f"{name}: {kind} at different positions, e.g. {differ.nonzero()[:4].tolist()}"
    finite = torch.isfinite(expected)
    if finite.any():
        err = rel_err(got[finite], expected[finite])
        assert err < tol, f"{name}: finite part, relative error {err:.3g} >= {tol:g}"


# ---------------------------------------------------------------------------------------------------
# scaled_residual
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("mean_subtract", [True, False], ids=["ms", "noms"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_scaled_residual(activation, mean_subtract, backend, dtype, seed):
    case = make_residual_case(ResidualSpec((10, 20), "contiguous", activation, mean_subtract, 0.7), dtype, seed)
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    poison(case.x, ROWS_0_TO_2)
    poison(case.branch_out, ROWS_3_TO_5)
    poison(grad_out, [((row + 6, col), value) for (row, col), value in ROWS_0_TO_2])

    def run(x, branch_out, grad, device="cpu", **backend_kwarg):
        x, branch_out = (t.detach().clone().to(device).requires_grad_() for t in (x, branch_out))
        fn = dmup_kernels.scaled_residual if backend_kwarg else reference.scaled_residual
        out = fn(x, branch_out, case.scale, activation, mean_subtract, **backend_kwarg)
        out.backward(grad.to(device))
        return out.detach().cpu(), x.grad.cpu(), branch_out.grad.cpu()

    got = run(case.x, case.branch_out, grad_out, backend_device(backend), backend=backend)
    expected = run(case.x.double(), case.branch_out.double(), grad_out.double())
    assert any(not torch.isfinite(e).all() for e in expected)  # the poison reached the result
    for name, g, e in zip(("output", "grad x", "grad branch_out"), got, expected):
        assert_nonfinite_match(g, e, name, TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------------
# residual_stack: two layers, a bias, row tiles split by rows (B = 37) or by features (B = 8)
# ---------------------------------------------------------------------------------------------------


def gradients(fn, tensors, kwargs: dict, grad_out: torch.Tensor, dtype: torch.dtype, device="cpu"):
    """Output and the gradient of each of ``tensors``, on the CPU: ``fn(*tensors, **kwargs)`` on ``device`` in
    ``dtype``."""
    leaves = [t.detach().to(device, dtype).clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(device, dtype))
    return [out.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]


def check_nonfinite(case, tensors: dict[str, torch.Tensor], fn, reference_fn, kwargs: dict, place: str,
                    dtype: torch.dtype, backend: str) -> None:  # fmt: skip
    """Poisons ``place`` ("rows": x and the incoming gradient; else the tensor of that name, in its last layer)
    and compares ``fn`` on ``backend`` with ``reference_fn`` in float64: output and every gradient."""
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    if place == "rows":
        poison(case.x, ROWS_0_TO_2)
        poison(grad_out, ROWS_3_TO_5)
    else:
        poison(tensors[place], BIAS_POISON if place.startswith("bias") else WEIGHT_POISON)
    leaves = [case.x, *tensors.values()]
    got = gradients(fn, leaves, dict(kwargs, backend=backend), grad_out, dtype, backend_device(backend))
    expected = gradients(reference_fn, leaves, kwargs, grad_out, torch.float64)
    assert any(not torch.isfinite(e).all() for e in expected)  # the poison reached the result
    for name, g, e in zip(["output", "grad x", *(f"grad {t}" for t in tensors)], got, expected):
        assert_nonfinite_match(g, e, name, TOLERANCE[dtype])


STACK_RUNS = [
    pytest.param("cpp", torch.float64, 8, marks=needs_cpp, id="cpp-f64-B8"),
    pytest.param("cpp", torch.float64, 37, marks=needs_cpp, id="cpp-f64-B37"),
    pytest.param("cpp", torch.float32, 8, marks=needs_cpp, id="cpp-f32-B8"),
    pytest.param("cpp", torch.float32, 37, marks=needs_cpp, id="cpp-f32-B37"),
    pytest.param("reference", torch.float32, 37, id="reference-f32-B37"),
    pytest.param("triton", torch.float64, 37, marks=needs_triton, id="triton-f64-B37"),
    pytest.param("triton", torch.float32, 37, marks=needs_triton, id="triton-f32-B37"),
    pytest.param("cuda", torch.float64, 37, marks=needs_cuda, id="cuda-f64-B37"),
    pytest.param("cuda", torch.float32, 37, marks=needs_cuda, id="cuda-f32-B37"),
]


@pytest.mark.parametrize("backend,dtype,batch", STACK_RUNS)
@pytest.mark.parametrize("place", ["rows", "weight", "bias"])
@pytest.mark.parametrize("block", ["post", "pre"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_residual_stack(activation, block, place, backend, dtype, batch, cpu_isa, seed):
    # Mean subtraction spreads one special value over its whole row: on where x and grad_out are
    # poisoned by rows, off where a weight or bias poisons one feature of every row.
    mean_subtract = place == "rows"
    spec = StackSpec(20, 2, (batch,), block, True, activation, mean_subtract, "contiguous")
    case = make_stack_case(spec, dtype, seed)
    kwargs = dict(scale=case.scale, activation=activation, block=block, mean_subtract=mean_subtract)
    tensors = {"weight": case.weight, "bias": case.bias}
    check_nonfinite(case, tensors, dmup_kernels.residual_stack, reference.residual_stack, kwargs, place, dtype, backend)


# ---------------------------------------------------------------------------------------------------
# residual_mlp_stack: the same runs, with both layers' weights and biases poisoned in turn
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,batch", STACK_RUNS)
@pytest.mark.parametrize("place", ["rows", "weight1", "weight2", "bias1", "bias2"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_residual_mlp_stack(activation, place, backend, dtype, batch, cpu_isa, seed):
    mean_subtract = place == "rows"  # as for residual_stack
    case = make_mlp_stack_case(MlpStackSpec(20, 24, 2, (batch,), True, activation, mean_subtract), dtype, seed)
    kwargs = dict(scale=case.scale, activation=activation, mean_subtract=mean_subtract)
    tensors = dict(zip(("weight1", "weight2", "bias1", "bias2"), case.params))
    fn, reference_fn = dmup_kernels.residual_mlp_stack, reference.residual_mlp_stack
    check_nonfinite(case, tensors, fn, reference_fn, kwargs, place, dtype, backend)
