"""Drop-in modules: backends "cpp" and "triton" against backend "reference", init, state_dict, repr, scale."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import dmup_kernels
from dmup_kernels import (
    COMPLETE_P,
    DEPTH_MUP,
    STANDARD,
    DepthMuPNet,
    DepthParametrization,
    ResidualMLPStack,
    ResidualStack,
    ScaledResidual,
    reference,
)

from conftest import OP_BACKENDS, backend_device, needs_cpp, needs_triton, rel_err
from sample_inputs import ACTIVATIONS, STACK_SPECS, StackSpec, make_stack_case, random_tensor

STACK_IDS = [spec.id for spec in STACK_SPECS]
IN_FEATURES, OUT_FEATURES = 3, 2


def tolerance(dtype: torch.dtype, depth: int) -> float:
    """docs/design.md §5.3: float64 exact up to rounding; float32 < 1e-5 typical, < 1e-4 allowed at large depth."""
    if dtype == torch.float64:
        return 1e-12 if depth <= 17 else 1e-11
    return 1e-5 if depth <= 17 else 1e-4


def build(kind: str, spec: StackSpec, backend: str, dtype: torch.dtype) -> nn.Module:
    kwargs = dict(
        activation=spec.activation,
        block=spec.block,
        mean_subtract=spec.mean_subtract,
        bias=spec.bias,
        backend=backend,
        dtype=dtype,
    )
    if kind == "stack":
        return ResidualStack(spec.width, spec.depth, **kwargs)
    return DepthMuPNet(IN_FEATURES, spec.width, spec.depth, OUT_FEATURES, **kwargs)


def forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_()  # clone keeps the strides of x
    out = module(x)
    out.backward(grad_out.to(out.dtype))
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), x.grad, grads


def randomize_biases(module: nn.Module, seed: int) -> None:
    """Biases start at zero; give them random values so their effect on the forward is tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64))


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["stack", "net"])
@pytest.mark.parametrize(
    "spec,backend",
    [pytest.param(spec, "cpp", marks=needs_cpp, id=f"{spec.id}-cpp") for spec in STACK_SPECS]
    # the interpreter walks every layer in Python: the 256-layer specs are left to the C++ backend
    + [
        pytest.param(spec, "triton", marks=needs_triton, id=f"{spec.id}-triton")
        for spec in STACK_SPECS
        if spec.depth <= 17
    ],
)
def test_backend_matches_reference(spec: StackSpec, kind, dtype, backend, seed):
    module = build(kind, spec, backend, dtype)
    randomize_biases(module, seed)
    # the reference runs in float64 from the same parameters and inputs
    ref = build(kind, spec, "reference", torch.float64)
    ref.load_state_dict(module.state_dict())
    in_features = spec.width if kind == "stack" else IN_FEATURES
    case = make_stack_case(spec, dtype, seed, in_features=in_features)
    out_features = spec.width if kind == "stack" else OUT_FEATURES
    grad_out = torch.randn(*spec.batch_shape, out_features, dtype=torch.float64)

    out, dx, grads = forward_backward(module, case.x, grad_out)
    ref_out, ref_dx, ref_grads = forward_backward(ref, case.x.to(torch.float64), grad_out)

    assert out.dtype == dtype and out.shape == ref_out.shape
    tol = tolerance(dtype, spec.depth)
    assert rel_err(out, ref_out) < tol, "output"
    assert rel_err(dx, ref_dx) < tol, "grad input"
    expected_names = {"weight", "bias"} if spec.bias else {"weight"}
    if kind == "net":
        expected_names = {f"stack.{name}" for name in expected_names} | {
            "input.weight",
            "input.bias",
            "output.weight",
            "output.bias",
        }
    assert set(grads) == set(ref_grads) == expected_names
    for name, grad in grads.items():
        assert grad is not None, name
        assert rel_err(grad, ref_grads[name]) < tol, f"grad {name}"


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("spec", STACK_SPECS[::3], ids=STACK_IDS[::3])
def test_cpp_backend_matches_reference_same_dtype_f32(spec: StackSpec, seed):
    """float32 cpp vs float32 reference, module copied through state_dict."""
    cpp = build("stack", spec, "cpp", torch.float32)
    randomize_biases(cpp, seed)
    ref = build("stack", spec, "reference", torch.float32)
    ref.load_state_dict(cpp.state_dict())
    case = make_stack_case(spec, torch.float32, seed)
    grad_out = torch.randn(*spec.batch_shape, spec.width)
    out, dx, grads = forward_backward(cpp, case.x, grad_out)
    ref_out, ref_dx, ref_grads = forward_backward(ref, case.x, grad_out)
    tol = tolerance(torch.float32, spec.depth)
    assert rel_err(out, ref_out) < tol
    assert rel_err(dx, ref_dx) < tol
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < tol, name


@pytest.mark.parametrize("backend", ["cpp", "reference", "auto"])
@pytest.mark.parametrize("spec", STACK_SPECS[::5], ids=STACK_IDS[::5])
def test_stack_forward_is_reference_formula(spec: StackSpec, backend, seed):
    """The module computes reference.residual_stack with scale 1/sqrt(L) (DEPTH_MUP, base depth 1)."""
    if backend == "cpp" and not dmup_kernels.HAS_CPP:
        pytest.skip("C++ extension not built")
    stack = build("stack", spec, backend, torch.float64)
    randomize_biases(stack, seed)
    case = make_stack_case(spec, torch.float64, seed)
    with torch.no_grad():
        got = stack(case.x)
        expected = reference.residual_stack(
            case.x,
            stack.weight,
            stack.bias,
            scale=1.0 / math.sqrt(spec.depth),
            activation=spec.activation,
            block=spec.block,
            mean_subtract=spec.mean_subtract,
        )
    assert rel_err(got, expected) < 1e-12


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mean_subtract", [True, False])
def test_scaled_residual_module(activation, mean_subtract, backend, seed):
    if backend == "cpp" and not dmup_kernels.HAS_CPP:
        pytest.skip("C++ extension not built")
    n = 24
    linear = nn.Linear(n, n, dtype=torch.float64)
    module = ScaledResidual(linear, 0.4, activation, mean_subtract, backend=backend)
    x = random_tensor((2, 5, n), torch.float64, torch.Generator().manual_seed(seed)).requires_grad_()
    g = torch.randn(2, 5, n, dtype=torch.float64)
    module(x).backward(g)
    got = (x.grad, linear.weight.grad, linear.bias.grad)

    # independent formula: x + s * MS(phi(x W^T + b)), differentiated by autograd
    x2 = x.detach().clone().requires_grad_()
    w2 = linear.weight.detach().clone().requires_grad_()
    b2 = linear.bias.detach().clone().requires_grad_()
    v = reference.activation(x2 @ w2.T + b2, activation)
    if mean_subtract:
        v = v - v.sum(dim=-1, keepdim=True) / n
    expected_out = x2 + 0.4 * v
    expected_out.backward(g)
    with torch.no_grad():
        assert rel_err(module(x), expected_out) < 1e-12
    for got_grad, expected in zip(got, (x2.grad, w2.grad, b2.grad)):
        assert rel_err(got_grad, expected) < 1e-12


def test_scaled_residual_module_reset_and_state_dict():
    module = ScaledResidual(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), 0.5, "gelu", True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert set(before) == {"branch.0.weight", "branch.0.bias", "branch.2.weight", "branch.2.bias"}
    module.reset_parameters()
    after = module.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    copy = ScaledResidual(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), 0.5, "gelu", True)
    copy.load_state_dict(after)
    x = torch.randn(3, 6)
    assert torch.equal(copy(x), module(x))


def test_scaled_residual_reset_keeps_the_branch_init():
    """A branch with its own reset_parameters keeps its initialisation: DepthMuPNet's zero readout is not
    overwritten by nn.Linear's default initialisation of that readout."""
    branch = DepthMuPNet(6, 8, 2, 6, readout_zero_init=True)
    module = ScaledResidual(branch, 0.5)
    with torch.no_grad():
        branch.output.weight.fill_(1.0)
    module.reset_parameters()
    assert torch.equal(branch.output.weight, torch.zeros_like(branch.output.weight))


def test_state_dict_round_trip_stack(seed):
    stack = ResidualStack(12, 5, bias=True, activation="silu", block="pre")
    randomize_biases(stack, seed)
    state = stack.state_dict()
    assert set(state) == {"weight", "bias"}
    assert state["weight"].shape == (5, 12, 12) and state["bias"].shape == (5, 12)
    other = ResidualStack(12, 5, bias=True, activation="silu", block="pre")
    assert not torch.equal(other.weight, stack.weight)
    other.load_state_dict(state)
    assert torch.equal(other.weight, stack.weight) and torch.equal(other.bias, stack.bias)
    x = torch.randn(4, 12)
    assert torch.equal(other(x), stack(x))
    assert set(ResidualStack(12, 5).state_dict()) == {"weight"}


def test_state_dict_round_trip_net(seed):
    net = DepthMuPNet(7, 16, 3, 4, bias=True)
    randomize_biases(net, seed)
    state = net.state_dict()
    assert set(state) == {
        "input.weight",
        "input.bias",
        "stack.weight",
        "stack.bias",
        "output.weight",
        "output.bias",
    }
    other = DepthMuPNet(7, 16, 3, 4, bias=True)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(5, 7)
    assert torch.equal(other(x), net(x))


def test_net_structure():
    net = DepthMuPNet(7, 16, 3, 4, activation="abs", block="pre")
    assert isinstance(net.input, nn.Linear) and (net.input.in_features, net.input.out_features) == (7, 16)
    assert isinstance(net.stack, ResidualStack) and (net.stack.width, net.stack.depth) == (16, 3)
    assert net.stack.activation == "abs" and net.stack.block == "pre"
    assert isinstance(net.output, nn.Linear) and (net.output.in_features, net.output.out_features) == (16, 4)
    assert net(torch.randn(2, 5, 7)).shape == (2, 5, 4)


def test_module_dtype_argument():
    stack = ResidualStack(8, 2, bias=True, dtype=torch.float64)
    assert stack.weight.dtype == torch.float64 and stack.bias.dtype == torch.float64
    net = DepthMuPNet(3, 8, 2, 1, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())


def _std_close(t: torch.Tensor, expected: float, rel: float) -> None:
    t = t.detach().double()
    assert abs(t.mean().item()) < 4 * expected / math.sqrt(t.numel()) + 1e-12
    assert t.std().item() == pytest.approx(expected, rel=rel)


def test_stack_init_statistics():
    width, depth = 128, 8  # 131072 samples: std estimate within ~0.2%
    stack = ResidualStack(width, depth, bias=True)
    _std_close(stack.weight, 1 / math.sqrt(width), rel=0.02)
    assert torch.count_nonzero(stack.bias) == 0
    # every layer gets its own draw at the same scale
    for layer in (0, depth - 1):
        assert stack.weight[layer].std().item() == pytest.approx(1 / math.sqrt(width), rel=0.05)
    assert not torch.equal(stack.weight[0], stack.weight[1])


def test_stack_reset_parameters():
    stack = ResidualStack(64, 4, bias=True)
    with torch.no_grad():
        stack.weight.fill_(3.0)
        stack.bias.fill_(2.0)
    stack.reset_parameters()
    _std_close(stack.weight, 1 / 8, rel=0.03)
    assert torch.count_nonzero(stack.bias) == 0


@pytest.mark.parametrize("readout_zero_init", [False, True])
def test_net_init_statistics(readout_zero_init):
    in_features, width, out_features = 100, 128, 96
    net = DepthMuPNet(in_features, width, 4, out_features, readout_zero_init=readout_zero_init, bias=True)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(5.0)
    net.reset_parameters()
    _std_close(net.input.weight, 1 / math.sqrt(in_features), rel=0.05)
    _std_close(net.stack.weight, 1 / math.sqrt(width), rel=0.03)
    assert torch.count_nonzero(net.input.bias) == 0
    assert torch.count_nonzero(net.stack.bias) == 0
    assert torch.count_nonzero(net.output.bias) == 0
    if readout_zero_init:
        assert torch.count_nonzero(net.output.weight) == 0
    else:
        _std_close(net.output.weight, 1 / width, rel=0.05)


def test_net_init_at_construction():
    net = DepthMuPNet(50, 64, 2, 64, readout_zero_init=True)
    assert torch.count_nonzero(net.output.weight) == 0
    _std_close(net.input.weight, 1 / math.sqrt(50), rel=0.08)


def test_extra_repr():
    stack = ResidualStack(
        48,
        17,
        activation="gelu",
        block="pre",
        mean_subtract=False,
        bias=True,
        parametrization=COMPLETE_P,
        backend="reference",
    )
    text = repr(stack)
    for needle in ("width=48", "depth=17", "'gelu'", "'pre'", "mean_subtract=False", "bias=True", "'reference'"):
        assert needle in text, needle
    match = re.search(r"scale=([-+0-9.eE]+)", text)
    assert match is not None and float(match.group(1)) == pytest.approx(1 / 17, rel=1e-5)  # the scale 1/L
    assert "alpha=1" in text and "gamma=0" in text

    net = DepthMuPNet(3, 16, 4, 2, readout_zero_init=True, activation="abs")
    text = repr(net)
    assert "readout_zero_init=True" in text and "depth=4" in text and "'abs'" in text

    module = ScaledResidual(nn.Linear(4, 4), 0.125, "silu", True, backend="reference")
    text = repr(module)
    assert "0.125" in text and "'silu'" in text and "mean_subtract=True" in text and "'reference'" in text


def test_numpy_integer_sizes_are_plain_ints():
    """Sizes computed with numpy (np.int64, np.int32) build the same modules as Python ints, which hold ints."""
    np = pytest.importorskip("numpy")
    stack = ResidualStack(
        np.int64(8), np.int64(3), total_depth=np.int32(6), base_width=np.int64(4), checkpoint=np.int64(2)
    )
    assert repr(stack) == repr(ResidualStack(8, 3, total_depth=6, base_width=4, checkpoint=2))
    assert all(
        type(getattr(stack, name)) is int for name in ("width", "depth", "total_depth", "base_width", "checkpoint")
    )
    net = DepthMuPNet(np.int64(3), np.int64(8), np.int64(2), np.int64(5))
    assert net(torch.randn(4, 3)).shape == (4, 5)
    assert [type(stage.depth) for stage in stack.split(np.int64(3))] == [int] * 3


@pytest.mark.parametrize("depth", [1, 2, 17, 256, 1000])
def test_scale_follows_parametrization(depth):
    cases = [
        (DEPTH_MUP, 1 / math.sqrt(depth)),
        (COMPLETE_P, 1 / depth),
        (STANDARD, 1.0),
        (DepthParametrization(alpha=0.5, gamma=0.5, multiplier=2.0, base_depth=8), 2.0 * math.sqrt(8 / depth)),
        (DepthParametrization(alpha=1.0, gamma=0.0, multiplier=0.5, base_depth=4), 0.5 * 4 / depth),
    ]
    for parametrization, expected in cases:
        stack = ResidualStack(2, depth, parametrization=parametrization)
        assert stack.scale == pytest.approx(expected, rel=1e-12)
    assert ResidualStack(2, depth).scale == pytest.approx(1 / math.sqrt(depth), rel=1e-12)  # DEPTH_MUP default


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_scale_is_used_in_forward(backend, seed):
    """A non-default parametrization changes the forward exactly as the formula says."""
    if backend == "cpp" and not dmup_kernels.HAS_CPP:
        pytest.skip("C++ extension not built")
    p = DepthParametrization(alpha=1.0, gamma=0.0, multiplier=3.0, base_depth=2)
    stack = ResidualStack(10, 6, parametrization=p, backend=backend, dtype=torch.float64)
    x = torch.randn(3, 10, dtype=torch.float64)
    with torch.no_grad():
        expected = reference.residual_stack(x, stack.weight, scale=3.0 * 2 / 6)
        assert rel_err(stack(x), expected) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_return_states_gives_the_whole_residual_stream(backend, dtype):
    stack = ResidualStack(12, 7, bias=True, backend=backend, dtype=dtype)
    with torch.no_grad():
        stack.bias.normal_()
    x = torch.randn(2, 5, 12, dtype=dtype, requires_grad=True)
    out, states = stack(x, return_states=True)
    expected = reference.residual_stream(
        x.detach().double(), stack.weight.detach().double(), stack.bias.detach().double(), scale=stack.scale
    )
    assert states.shape == (8, 2, 5, 12) and not states.requires_grad
    assert torch.equal(states[0], x.detach()) and torch.equal(states[-1], out.detach())
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(states, torch.stack(expected)) < tolerance
    out.sum().backward()  # the output stays differentiable
    assert x.grad is not None and stack.weight.grad is not None


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_inference_mode_gives_the_no_grad_result(backend, seed):
    """Under torch.inference_mode every module runs its op without autograd, as under torch.no_grad: the same
    output, bit for bit, as an inference tensor."""
    device = backend_device(backend)
    modules = [
        ResidualStack(16, 5, bias=True, backend=backend, device=device),
        ResidualMLPStack(16, 24, 3, bias=True, backend=backend, device=device),
        ScaledResidual(nn.Linear(16, 16, device=device), 0.5, "gelu", True, backend=backend),
    ]
    x = torch.randn(3, 16, device=device, requires_grad=True)
    for module in modules:
        with torch.no_grad():
            expected = module(x)
        with torch.inference_mode():
            got = module(x)
        assert got.is_inference() and not got.requires_grad, type(module).__name__
        assert torch.equal(got, expected), type(module).__name__
