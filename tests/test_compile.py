"""torch.compile(fullgraph=True) traces the modules without graph breaks and gives eager's results, also with
dynamic=True, where the batch size and the modules' numbers (the branch scale) are symbolic (the fake and autograd
registrations of the dmup ops are what make this work), on every backend with its tensors where it runs
(conftest.backend_device): "cpp" on the CPU, "cuda" on a GPU, "triton" on CPU tensors under the Triton interpreter
and on CUDA tensors on a GPU. Under the interpreter the Triton ops are opaque custom ops; on a GPU, triton_op lets
the compiler see the kernels."""

from __future__ import annotations

import pytest
import torch

import dmup_kernels as dk

from conftest import OP_BACKENDS, backend_device


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def models(backend: str) -> list[torch.nn.Module]:
    """One module of each kind on ``backend``, on the device of its tensors."""
    torch.manual_seed(0)
    modules = [
        dk.DepthMuPNet(8, 16, 6, 3, bias=True, backend=backend),
        dk.ResidualStack(16, 5, activation="gelu", block="pre", backend=backend),
        dk.ResidualMLPStack(16, 24, 3, activation="silu", bias=True, backend=backend),
        dk.ScaledResidual(torch.nn.Linear(16, 16), 0.5, "silu", True, backend=backend),
    ]
    return [module.to(backend_device(backend)) for module in modules]


@pytest.mark.parametrize("dynamic", [None, True], ids=["dynamic-auto", "dynamic"])
@pytest.mark.parametrize("backend", ["reference", *OP_BACKENDS])
def test_compile_fullgraph_matches_eager_forward_and_backward(backend, dynamic):
    for model in models(backend):
        width = model.input.in_features if isinstance(model, dk.DepthMuPNet) else 16
        compiled_model = torch.compile(model, fullgraph=True, dynamic=dynamic)
        for batch in (5, 7):
            x = torch.randn(batch, width, device=backend_device(backend), requires_grad=True)
            eager = model(x)
            (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
            compiled = compiled_model(x)
            (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamic", [None, True], ids=["dynamic-auto", "dynamic"])
def test_compiled_stack_follows_a_new_total_depth(dynamic):
    """The branch scale is read on every call, so changing total_depth changes the compiled result too."""
    stack = dk.ResidualStack(16, 5)
    compiled = torch.compile(stack, fullgraph=True, dynamic=dynamic)
    x = torch.randn(4, 16)
    before = compiled(x)
    stack.total_depth = 20
    after = compiled(x)
    torch.testing.assert_close(after, stack(x))
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_explain_finds_no_graph_break(backend):
    for model in models(backend):
        width = model.input.in_features if isinstance(model, dk.DepthMuPNet) else 16
        explanation = torch._dynamo.explain(model)(torch.randn(4, width, device=backend_device(backend)))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
