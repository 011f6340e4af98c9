"""dmup_kernels.scaled_residual on every backend ("cpp", "triton", "cuda") against the float64 eager reference
(docs/design.md §5); for "cpp" also bfloat16, gradcheck, opcheck, empty batches and stride-0 inputs. The Triton
and CUDA specifics are in test_triton_kernels.py and test_cuda_kernels.py."""

from __future__ import annotations

import pytest
import torch

import dmup_kernels
from dmup_kernels import reference
from dmup_kernels._layout import EpilogueSettings
from dmup_kernels.ops.scaled_residual import EPILOGUE_BACKENDS

from conftest import OP_BACKENDS, backend_device, needs_cpp, rel_err, saved_bytes
from parity import check_residual, check_within_twice_eager, run_residual, run_residual_reference
from sample_inputs import (
    ACTIVATIONS,
    RESIDUAL_SPECS,
    WIDE_RESIDUAL_SPECS,
    ResidualSpec,
    make_residual_case,
    sample_inputs,
)

pytestmark = pytest.mark.usefixtures("nan_poison")

SPEC_IDS = [spec.id for spec in RESIDUAL_SPECS]
PARITY_SPECS = RESIDUAL_SPECS + WIDE_RESIDUAL_SPECS


def test_nan_poisoning_is_active(nan_poison):
    assert torch.empty(1000).isnan().all()
    assert torch.empty(7, 13, dtype=torch.float64).isnan().all()
    assert torch.empty_like(torch.ones(5, 5)).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("spec", PARITY_SPECS, ids=[spec.id for spec in PARITY_SPECS])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_matches_reference(backend, spec: ResidualSpec, dtype, seed):
    case = make_residual_case(spec, dtype, seed, requires_grad=True).to(backend_device(backend))
    check_residual(case, dtype, backend)


@needs_cpp
@pytest.mark.parametrize("spec", RESIDUAL_SPECS, ids=SPEC_IDS)
def test_bfloat16_within_twice_eager_error(spec: ResidualSpec, seed):
    """bf16: the kernel's error vs the float64 reference is <= 2x eager bf16's error + 1e-3."""
    case = make_residual_case(spec, torch.bfloat16, seed, requires_grad=True)
    grad_out = torch.randn(spec.shape, dtype=torch.bfloat16)
    out, dx, db = run_residual(case, grad_out, "cpp")
    ref_out, ref_dx, ref_db = run_residual_reference(case, grad_out)

    x = case.x.detach().clone().requires_grad_()
    b = case.branch_out.detach().clone().requires_grad_()
    eager = reference.scaled_residual(x, b, case.scale, case.activation, case.mean_subtract)
    eager.backward(grad_out)
    check_within_twice_eager(
        ("output", "grad x", "grad branch_out"),
        (out, dx, db),
        (eager.detach(), x.grad, b.grad),
        (ref_out, ref_dx, ref_db),
        torch.bfloat16,
    )


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_contract_backward_matches_reference(backend, seed):
    """Each backend's ``backward`` (what the ops' autograd rules call) against the reference's, in float64."""
    settings = EpilogueSettings(0.7, "gelu", True)
    x, branch_out, grad_out = (torch.randn(5, 33, dtype=torch.float64) for _ in range(3))

    def gradients(name: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        epilogue = EPILOGUE_BACKENDS[name]
        _, state = epilogue.forward(x.to(device), branch_out.to(device), settings)
        return epilogue.backward(grad_out.to(device), state, settings)

    for name, got, ref in zip(("grad x", "grad branch_out"), gradients(backend, backend_device(backend)),
                              gradients("reference", "cpu")):  # fmt: skip
        assert rel_err(got, ref) < 1e-12, name


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_saves_what_eager_saves(backend, activation, seed):
    """The fused op keeps branch_out only where phi' reads it: nothing for the identity (eager's
    x + s * MS(branch_out) keeps nothing either), branch_out for a nonlinear phi."""
    device = backend_device(backend)
    x, branch_out = (torch.randn(6, 40, device=device, requires_grad=True) for _ in range(2))

    def run(name: str):
        return lambda: dmup_kernels.scaled_residual(x, branch_out, 0.5, activation, True, backend=name)

    ours = saved_bytes(run(backend), exclude=[])
    assert ours == saved_bytes(run("reference"), exclude=[])
    assert ours == (0 if activation == "identity" else branch_out.nbytes)


@needs_cpp
def test_auto_backend_is_cpp_on_cpu(seed):
    for case in sample_inputs(torch.float32, seed, specs=RESIDUAL_SPECS[::9]):
        auto = dmup_kernels.scaled_residual(*case.args())
        cpp = dmup_kernels.scaled_residual(*case.args(), backend="cpp")
        ref = dmup_kernels.scaled_residual(*case.args(), backend="reference")
        assert torch.equal(auto, cpp)
        assert rel_err(ref, reference.scaled_residual(*case.args())) == 0


@needs_cpp
def test_output_is_new_contiguous_tensor(seed):
    for case in sample_inputs(torch.float64, seed, specs=RESIDUAL_SPECS[:8]):
        out = dmup_kernels.scaled_residual(*case.args(), backend="cpp")
        assert out.is_contiguous()
        assert out.data_ptr() != case.x.data_ptr() and out.data_ptr() != case.branch_out.data_ptr()
        # inputs untouched
        assert torch.isfinite(case.x).all() and torch.isfinite(case.branch_out).all()


@needs_cpp
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 5)])
def test_empty_batch(shape):
    x = torch.randn(shape)
    out = dmup_kernels.scaled_residual(x, x.clone(), 0.5, "relu", True, backend="cpp")
    assert out.shape == x.shape


@needs_cpp
def test_only_x_requires_grad(seed):
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 9, dtype=torch.float64)
    g = torch.randn(4, 9, dtype=torch.float64)
    dmup_kernels.scaled_residual(x, b, 0.5, "silu", True, backend="cpp").backward(g)
    assert torch.equal(x.grad, g)


def _gradcheck_specs() -> list[ResidualSpec]:
    specs = []
    shapes = [(3, 5), (1, 4), (2, 2, 3), (4, 1)]
    layouts = ["contiguous", "transposed", "sliced", "mixed"]
    for i, activation in enumerate(ACTIVATIONS):
        for j, mean_subtract in enumerate((True, False)):
            k = 2 * i + j
            specs.append(ResidualSpec(shapes[k % 4], layouts[(k + 1) % 4], activation, mean_subtract, 0.8 - 0.3 * j))
    return specs


GRADCHECK_SPECS = _gradcheck_specs()


@needs_cpp
@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=[s.id for s in GRADCHECK_SPECS])
def test_gradcheck(spec: ResidualSpec, seed):
    # |branch_out| >= 0.2 keeps finite differences away from the kinks of relu and abs
    case = make_residual_case(spec, torch.float64, seed, requires_grad=True, away_from_zero=0.2)

    def fn(x, b):
        return dmup_kernels.scaled_residual(x, b, case.scale, case.activation, case.mean_subtract, backend="cpp")

    assert torch.autograd.gradcheck(fn, (case.x, case.branch_out), eps=1e-6, atol=1e-8, rtol=1e-6)


OPCHECK_SPECS = [
    ResidualSpec((3, 5), "contiguous", "relu", True, 0.5),
    ResidualSpec((2, 3, 48), "transposed", "gelu", False, -0.75),
    ResidualSpec((1, 200), "sliced", "silu", True, 1.0),
    ResidualSpec((4, 1), "mixed", "abs", True, 2.0),
    ResidualSpec((6, 96), "contiguous", "identity", False, 0.25),
]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("spec", OPCHECK_SPECS, ids=[s.id for s in OPCHECK_SPECS])
def test_opcheck(spec: ResidualSpec, dtype, seed):
    case = make_residual_case(spec, dtype, seed, requires_grad=True)
    torch.library.opcheck(torch.ops.dmup.scaled_residual.default, case.args())


@needs_cpp
def test_opcheck_backward_op(seed):
    case = make_residual_case(ResidualSpec((5, 7), "contiguous", "gelu", True, 0.5), torch.float64, seed)
    grad_out = torch.randn(5, 7, dtype=torch.float64)
    args = (grad_out, case.branch_out, case.scale, case.activation, case.mean_subtract)
    torch.library.opcheck(
        torch.ops.dmup.scaled_residual_backward.default, args, test_utils=("test_schema", "test_faketensor")
    )


@needs_cpp
@pytest.mark.parametrize("mean_subtract", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expanded_inputs_and_grad(activation, mean_subtract, seed):
    """Stride-0 inputs (expand) and the stride-0 grad_out that .sum().backward() produces."""
    x = torch.randn(5, 1, dtype=torch.float64).expand(5, 33).requires_grad_()
    b = torch.randn(1, 33, dtype=torch.float64).expand(5, 33).requires_grad_()
    out = dmup_kernels.scaled_residual(x, b, 0.6, activation, mean_subtract, backend="cpp")
    out.sum().backward()
    x64, b64 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = reference.scaled_residual(x64, b64, 0.6, activation, mean_subtract)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-12
    assert rel_err(x.grad, x64.grad) < 1e-12
    assert rel_err(b.grad, b64.grad) < 1e-12
