"""torch.func (functional_call, grad, vjp, vmap of grad) and gradcheck on the modules, for the reference and
the fused backends "cpp", "triton" and "cuda", each with its tensors where it runs (conftest.backend_device:
"triton" on CPU tensors under the Triton interpreter and on CUDA tensors on a GPU, "cuda" on a GPU); the
float64 references run on the CPU. Double backward works on the reference and raises a clear error on the
fused ops (dmup_kernels/_registration.py explains why torch.library.register_autograd alone fails here)."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from dmup_kernels import DepthMuPNet, ResidualMLPStack, ResidualStack, ScaledResidual

from conftest import OP_BACKENDS, OpLog, backend_device, rel_err
from sample_inputs import random_tensor

BACKENDS = ["reference", *OP_BACKENDS]
KINDS = ["scaled_residual", "stack", "net"]
WIDTH, DEPTH, BATCH = 12, 5, 4
DOUBLE_BACKWARD = r"double backward through dmup::\w+ is not supported"
FORWARD_MODE = r"forward-mode AD .* through dmup::\w+ is not supported"


def make_module(kind: str, backend: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small module of each kind, on the device of ``backend``'s tensors; biases made non-zero so that
    their gradients are tested too. The parameters are drawn on the CPU: the same values on every device."""
    if kind == "scaled_residual":
        module = ScaledResidual(nn.Linear(WIDTH, WIDTH, dtype=dtype), 0.6, "gelu", True, backend=backend)
    elif kind == "stack":
        module = ResidualStack(WIDTH, DEPTH, activation="silu", block="pre", bias=True, backend=backend, dtype=dtype)
    else:
        module = DepthMuPNet(7, WIDTH, DEPTH, 3, activation="gelu", bias=True, backend=backend, dtype=dtype)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    return module.to(backend_device(backend))


def as_reference(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` on the CPU with every submodule on the reference backend: the ground truth."""
    ref = copy.deepcopy(module).to("cpu", torch.float64)
    for sub in ref.modules():
        if hasattr(sub, "backend"):
            sub.backend = "reference"
    return ref


def in_features(module: nn.Module) -> int:
    return module.input.in_features if isinstance(module, DepthMuPNet) else WIDTH


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def loss_of(module: nn.Module):
    """loss(params, x) = sum(module_params(x)^2) / 2 through functional_call."""
    return lambda params, x: functional_call(module, params, (x,)).square().sum() / 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_functional_call_uses_the_given_parameters(kind, backend, seed):
    module = make_module(kind, backend)
    other = make_module(kind, backend)  # different random parameters
    x = torch.randn(BATCH, in_features(module)).to(backend_device(backend))
    out = functional_call(module, params_of(other), (x,))
    with torch.no_grad():
        expected = as_reference(other)(x.cpu().double())
    assert rel_err(out, expected) < 1e-5
    assert rel_err(module(x), expected) > 1e-2  # the module's own parameters were left alone


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_func_grad_matches_float64_reference(kind, backend, seed):
    module = make_module(kind, backend)
    x = torch.randn(BATCH, in_features(module)).to(backend_device(backend))
    grads, grad_x = grad(loss_of(module), argnums=(0, 1))(params_of(module), x)

    ref = as_reference(module)
    x64 = x.cpu().double().requires_grad_()
    loss = loss_of(ref)(dict(ref.named_parameters()), x64)
    ref_grads = torch.autograd.grad(loss, [x64, *ref.parameters()])
    assert set(grads) == {name for name, _ in ref.named_parameters()}
    assert rel_err(grad_x, ref_grads[0]) < 1e-5
    for (name, _), ref_grad in zip(ref.named_parameters(), ref_grads[1:]):
        assert rel_err(grads[name], ref_grad) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_vjp_and_per_sample_grads(backend, seed):
    """vjp of the stack, and per-sample gradients (vmap over grad; the fused ops run through torch's
    batching fallback, one sample at a time) against one autograd call per sample in float64."""
    module = make_module("stack", backend)
    x = torch.randn(BATCH, WIDTH).to(backend_device(backend))
    params = params_of(module)
    out, pullback = vjp(lambda p: functional_call(module, p, (x,)), params)
    cotangent = torch.randn_like(out)
    (grads,) = pullback(cotangent)
    ref = as_reference(module)
    ref_out = ref(x.cpu().double())
    ref_grad = torch.autograd.grad(ref_out, ref.weight, cotangent.cpu().double())[0]
    assert rel_err(out, ref_out) < 1e-5 and rel_err(grads["weight"], ref_grad) < 1e-5

    def sample_loss(p, row):
        return loss_of(module)(p, row.unsqueeze(0))

    with pytest.warns(UserWarning, match="batching rule") if backend != "reference" else nullcontext():
        per_sample = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    for i in range(BATCH):
        loss = loss_of(ref)(dict(ref.named_parameters()), x[i : i + 1].cpu().double())
        assert rel_err(per_sample["weight"][i], torch.autograd.grad(loss, ref.weight)[0]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_over_parameters_and_input(kind, backend, seed):
    module = make_module(kind, backend, torch.float64)
    names = [name for name, _ in module.named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    # away from 0 so that no h sits on the kink of the activation within gradcheck's step
    x = random_tensor((3, in_features(module)), torch.float64, generator, away_from_zero=0.1)
    x = x.to(backend_device(backend)).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def f(x, *values):
        return functional_call(module, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)  # a random projection: few calls


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward(kind, backend, seed):
    """Reference: gradgradcheck passes. Fused ops: a clear RuntimeError, in autograd and in nested
    torch.func.grad, instead of a gradient with its second-order term missing."""
    reference_x = torch.randn(3, WIDTH if kind != "net" else 7, dtype=torch.float64, requires_grad=True)
    reference_module = make_module(kind, "reference", torch.float64)
    assert torch.autograd.gradgradcheck(lambda x: reference_module(x), (reference_x,), fast_mode=True)

    module = make_module(kind, backend, torch.float64)
    x = reference_x.detach().to(backend_device(backend)).requires_grad_()
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.gradgradcheck(lambda x: module(x), (x,), fast_mode=True)
    params = params_of(module)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        grad(lambda x: grad(loss_of(module), argnums=1)(params, x).square().sum())(x.detach())
    # first-order gradients recorded with create_graph=True (what gradgradcheck starts from) are still right
    (first,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(as_reference(module)(reference_x).square().sum(), reference_x)
    assert rel_err(first, expected) < 1e-12


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode(kind, backend, seed):
    """Reference: jvp's tangent is the Jacobian (from reverse mode) times the direction. Fused ops: jvp, jacfwd,
    hessian and torch.autograd.forward_ad raise a clear RuntimeError instead of a zero derivative; inside a dual
    level, inputs without a tangent still run."""
    module = make_module(kind, backend, torch.float64)
    reference_module = as_reference(module)
    x = torch.randn(3, in_features(module), dtype=torch.float64)
    direction = torch.randn_like(x)
    _, tangent = jvp(reference_module, (x,), (direction,))
    jacobian = jacrev(reference_module)(x)
    assert rel_err(tangent, torch.einsum("ijkl,kl->ij", jacobian, direction)) < 1e-12

    x, direction = x.to(backend_device(backend)), direction.to(backend_device(backend))
    for transform in (
        lambda: jvp(module, (x,), (direction,)),
        lambda: jacfwd(module)(x),
        lambda: hessian(lambda x: module(x).sum())(x[0]),
    ):
        with pytest.raises(RuntimeError, match=FORWARD_MODE):
            transform()
    with forward_ad.dual_level():
        with pytest.raises(RuntimeError, match=FORWARD_MODE):
            module(forward_ad.make_dual(x, direction))
        with torch.no_grad():
            assert rel_err(module(x), reference_module(x.cpu())) < 1e-12


ZERO_FILLS = ("zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like")


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("kind", ["stack", "mlp_stack"])
def test_backward_materialises_no_state_gradients(kind, backend, seed):
    """The forward ops also return the saved state and sign bits, which no loss depends on. The backward
    must not receive zero gradients for them from autograd: tensors as large as the state, allocated and
    filled in every training step (docs/design.md §7.9)."""
    device = backend_device(backend)
    if kind == "stack":
        module = ResidualStack(WIDTH, DEPTH, bias=True, backend=backend)
    else:
        module = ResidualMLPStack(WIDTH, 2 * WIDTH, DEPTH, bias=True, backend=backend)
    module = module.to(device)
    y = module(torch.randn(BATCH, WIDTH).to(device))
    with OpLog() as log:
        y.square().sum().backward()
    assert any("_backward" in call for call in log.calls), log.calls  # the log saw the backward op
    fills = [call for call in log.calls if call.split(".")[1] in ZERO_FILLS]
    assert not fills, f"the backward filled tensors: {fills}"
