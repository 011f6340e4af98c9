"""torch.compile(fullgraph=True) traces the modules without graph breaks and gives eager's results
(the fake and autograd registrations of the dmup ops are what make this work). Under the Triton
interpreter the Triton ops are opaque custom ops; on a GPU, triton_op lets the compiler see the kernels."""

from __future__ import annotations

import pytest
import torch

import dmup_kernels as dk

from conftest import needs_cpp, needs_triton


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def models(backend: str) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        dk.DepthMuPNet(8, 16, 6, 3, bias=True, backend=backend),
        dk.ResidualStack(16, 5, activation="gelu", block="pre", backend=backend),
        dk.ScaledResidual(torch.nn.Linear(16, 16), 0.5, "silu", True, backend=backend),
    ]


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
)
def test_compile_fullgraph_matches_eager_forward_and_backward(backend):
    for model in models(backend):
        width = model.input.in_features if isinstance(model, dk.DepthMuPNet) else 16
        x = torch.randn(5, width, requires_grad=True)
        eager = model(x)
        (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
        compiled = torch.compile(model, fullgraph=True)(x)
        (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)])
def test_explain_finds_no_graph_break(backend):
    for model in models(backend):
        width = model.input.in_features if isinstance(model, dk.DepthMuPNet) else 16
        explanation = torch._dynamo.explain(model)(torch.randn(4, width))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
