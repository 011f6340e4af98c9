"""Parity checks shared by the op tests (docs/design.md §5): run one backend and the float64 eager reference on the
same case and compare every output and gradient by relative error.

One piece of code per check, so that every backend ("cpp", "triton", "cuda") is held to the same rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

import dmup_kernels
from dmup_kernels import reference

from conftest import num_threads, rel_err
from sample_inputs import MlpStackCase, ResidualCase, StackCase

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def check_within_twice_eager(names, got, eager, expected, dtype: torch.dtype | None, floor: float = 1e-3) -> None:
    """The 2x-eager rule (docs/design.md §5.5): each half-precision result (in ``dtype`` unless None) lies within
    twice the error of eager PyTorch run the same way, plus ``floor``, of the float64 reference (None where a
    result is absent)."""
    for name, value, eager_value, want in zip(names, got, eager, expected, strict=True):
        if want is None:
            continue
        assert dtype is None or value.dtype == dtype, name
        assert rel_err(value, want) <= 2 * rel_err(eager_value, want) + floor, name


# ---------------------------------------------------------------------------------------------------
# scaled_residual
# ---------------------------------------------------------------------------------------------------


def run_residual(case: ResidualCase, grad_out: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Output and gradients (x, branch_out) of one backend; the case's tensors must require grad."""
    out = dmup_kernels.scaled_residual(*case.args(), backend=backend)
    out.backward(grad_out)
    return out.detach(), case.x.grad, case.branch_out.grad


def run_residual_reference(case: ResidualCase, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Output and gradients (x, branch_out) of the reference in float64 on the CPU from the same inputs cast up."""
    x = case.x.detach().to("cpu", torch.float64).requires_grad_()
    b = case.branch_out.detach().to("cpu", torch.float64).requires_grad_()
    out = reference.scaled_residual(x, b, case.scale, case.activation, case.mean_subtract)
    out.backward(grad_out.to("cpu", torch.float64))
    return out.detach(), x.grad, b.grad


def check_residual(case: ResidualCase, dtype: torch.dtype, backend: str) -> None:
    """Every output and gradient of ``backend`` within TOLERANCE[dtype] of the float64 reference."""
    grad_out = torch.randn(case.x.shape, dtype=dtype).to(case.x.device)
    out, dx, db = run_residual(case, grad_out, backend)
    ref_out, ref_dx, ref_db = run_residual_reference(case, grad_out)
    assert out.shape == case.x.shape and out.dtype == dtype and out.device == case.x.device
    assert dx is not None and db is not None
    assert dx.shape == case.x.shape and db.shape == case.branch_out.shape
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) < tol, "output"
    assert rel_err(dx, ref_dx) < tol, "grad x"
    assert rel_err(db, ref_db) < tol, "grad branch_out"


# ---------------------------------------------------------------------------------------------------
# residual_stack
# ---------------------------------------------------------------------------------------------------


def stack_kwargs(case: StackCase) -> dict:
    spec = case.spec
    return dict(scale=case.scale, activation=spec.activation, block=spec.block, mean_subtract=spec.mean_subtract)


def run_stack(case: StackCase, grad_out: Tensor, backend: str):
    """Output and gradients (x, weight, bias) of one backend; the case's tensors become leaves with grads."""
    x, weight, bias = case.x.requires_grad_(), case.weight.requires_grad_(), case.bias
    if bias is not None:
        bias.requires_grad_()
    out = dmup_kernels.residual_stack(x, weight, bias, backend=backend, **stack_kwargs(case))
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, None if bias is None else bias.grad


def run_stack_reference(case: StackCase, grad_out: Tensor, dtype: torch.dtype = torch.float64):
    """Output and gradients of the eager reference on the CPU in ``dtype`` from the case's inputs cast to it."""
    x = case.x.detach().to("cpu", dtype).requires_grad_()
    weight = case.weight.detach().to("cpu", dtype).requires_grad_()
    bias = None if case.bias is None else case.bias.detach().to("cpu", dtype).requires_grad_()
    # one thread: the reference's small GEMMs gain nothing from two, and lose a lot when the cores are busy
    with num_threads(1):
        out = reference.residual_stack(x, weight, bias, **stack_kwargs(case))
        out.backward(grad_out.to("cpu", dtype))
    return out.detach(), x.grad, weight.grad, None if bias is None else bias.grad


def check_stack(case: StackCase, dtype: torch.dtype, backend: str) -> None:
    """Output and every gradient of ``backend`` within TOLERANCE[dtype] of the float64 reference."""
    grad_out = torch.randn(case.x.shape, dtype=dtype).to(case.x.device)
    got = run_stack(case, grad_out, backend)
    ref = run_stack_reference(case, grad_out)
    out, dx, dw, db = got
    assert out.shape == case.x.shape and dx.shape == case.x.shape and dw.shape == case.weight.shape
    assert (db is None) == (case.bias is None)
    assert_within_tolerance(("output", "grad x", "grad weight", "grad bias"), got, ref, dtype, case.x.device)


def assert_within_tolerance(
    names: tuple[str, ...], got, ref, dtype: torch.dtype, device: torch.device, tol: float | None = None
) -> None:
    """Each result of ``got`` of ``dtype`` on ``device`` and within ``tol`` (TOLERANCE[dtype] by default) of
    the reference's result of that name; results the reference does not have (None) are skipped."""
    tol = TOLERANCE[dtype] if tol is None else tol
    for name, value, expected in zip(names, got, ref):
        if expected is None:
            continue
        assert value.dtype == dtype and value.device == device, name
        err = rel_err(value, expected)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


# ---------------------------------------------------------------------------------------------------
# residual_mlp_stack
# ---------------------------------------------------------------------------------------------------

MLP_RESULTS = ("output", "grad x", "grad weight1", "grad weight2", "grad bias1", "grad bias2")
"""The names of what run_mlp_stack returns, in order."""


def mlp_stack_kwargs(case: MlpStackCase) -> dict:
    spec = case.spec
    return dict(scale=case.scale, activation=spec.activation, mean_subtract=spec.mean_subtract)


def mlp_outputs_and_grads(
    case: MlpStackCase, grad_out: Tensor, backend: str, dtype: torch.dtype | None = None, **options
) -> list[Tensor | None]:
    """Output and gradients (x, weight1, weight2, bias1, bias2; None without biases) of one backend, from
    fresh leaf copies of the case's tensors (cast to ``dtype`` if given), so repeated calls do not
    accumulate; ``options`` go to residual_mlp_stack (checkpoint, ...)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in (case.x, *case.params)]
    func = reference.residual_mlp_stack if backend == "eager" else dmup_kernels.residual_mlp_stack
    if backend != "eager":
        options["backend"] = backend
    out = func(*leaves, **mlp_stack_kwargs(case), **options)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def run_mlp_stack_reference(case: MlpStackCase, grad_out: Tensor, dtype: torch.dtype = torch.float64):
    """Output and gradients of the eager reference on the CPU in ``dtype`` from the case's inputs cast to it."""
    with num_threads(1):  # as in run_stack_reference
        return mlp_outputs_and_grads(case.to("cpu"), grad_out.to("cpu"), "eager", dtype)


def check_mlp_stack(case: MlpStackCase, dtype: torch.dtype, backend: str, tol: float | None = None) -> None:
    """Output and every gradient of ``backend`` within ``tol`` (TOLERANCE[dtype] by default) of the float64
    reference."""
    grad_out = torch.randn(case.x.shape, dtype=dtype).to(case.x.device)
    got = mlp_outputs_and_grads(case, grad_out, backend)
    ref = run_mlp_stack_reference(case, grad_out)
    for name, value, tensor in zip(MLP_RESULTS, got, (case.x, case.x, *case.params)):
        assert (value is None) == (tensor is None), name
        assert value is None or value.shape == tensor.shape, name
    assert_within_tolerance(MLP_RESULTS, got, ref, dtype, case.x.device, tol)
