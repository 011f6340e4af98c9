"""torch.autocast("cpu", dtype=torch.bfloat16): every backend's error against the float64 reference
is at most 2x eager PyTorch's under the same autocast (docs/design.md §5.5), in the output and the
gradients, and the result has eager's dtype.

The fused CPU and Triton ops keep float32 GEMM operands under autocast (autocast does not reach custom
ops): on CPUs without bfloat16 arithmetic (AVX512_BF16 / AMX) a bfloat16 GEMM is slower than a float32
one, 3-4x on this project's AVX-512 machine (README, "Using with torch.compile / DDP / pipelines").
"""

from __future__ import annotations

import pytest
import torch

from dmup_kernels import DepthMuPNet, ResidualMLPStack, ResidualStack, ScaledResidual

from conftest import needs_cpp, needs_triton, rel_err
from parity import check_within_twice_eager

BACKENDS = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]


def make_model(kind: str, backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "stack":
        return ResidualStack(48, 6, activation="gelu", bias=True, backend=backend)
    if kind == "mlp":
        return ResidualMLPStack(48, 96, 6, activation="gelu", bias=True, backend=backend)
    if kind == "residual":  # autocast's bfloat16 branch output meets a float32 stream
        return ScaledResidual(torch.nn.Linear(48, 48), 0.5, "silu", mean_subtract=True, backend=backend)
    return DepthMuPNet(20, 48, 6, 5, bias=True, backend=backend)


def run(model: torch.nn.Module, x: torch.Tensor, autocast: bool):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward() if autocast else out.square().sum().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["stack", "mlp", "net", "residual"])
def test_autocast_error_within_twice_eager(kind, backend, seed):
    model = make_model(kind, backend)
    x = torch.randn(37, 20 if kind == "net" else 48)
    reference = make_model(kind, "reference").double()
    reference.load_state_dict(model.state_dict())
    ref_out, ref_dx, ref_grads = run(reference, x.double(), autocast=False)
    eager_model = make_model(kind, "reference")
    eager_model.load_state_dict(model.state_dict())
    eager = run(eager_model, x, autocast=True)
    got = run(model, x, autocast=True)
    assert got[0].dtype == eager[0].dtype
    names = ["output", "grad x", *(f"grad {i}" for i in range(len(ref_grads)))]
    expected = [ref_out, ref_dx, *ref_grads]
    eager_results = [eager[0], eager[1], *eager[2]]
    for name, eager_value, want in zip(names, eager_results, expected, strict=True):
        assert rel_err(eager_value, want) > 1e-4, f"{name}: autocast did not reach eager"  # the rule means something
    # the gradients of float32 parameters are float32, the output in autocast's dtype (checked above)
    check_within_twice_eager(names, [got[0], got[1], *got[2]], eager_results, expected, dtype=None, floor=1e-4)
