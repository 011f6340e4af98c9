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
from sample_inputs import ResidualCase, StackCase

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


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
    tol = TOLERANCE[dtype]
    names = ("output", "grad x", "grad weight", "grad bias")
    out, dx, dw, db = got
    assert out.dtype == dtype and out.shape == case.x.shape
    assert dx.shape == case.x.shape and dw.shape == case.weight.shape
    assert (db is None) == (case.bias is None)
    for name, value, expected in zip(names, got, ref):
        if expected is None:
            continue
        assert value.dtype == dtype and value.device == case.x.device, name
        err = rel_err(value, expected)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"
