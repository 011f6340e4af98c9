"""The MLP stack dmup::residual_mlp_stack: dmup_kernels.residual_mlp_stack on every backend against the float64
eager reference (docs/design.md §5), and ResidualMLPStack: conversions, DepthMuPNet(hidden_width=...),
param_groups, torch.compile and torch.func, empty batches.

Tolerances (docs/design.md §5.3): float64 < 1e-12 and float32 < 1e-5 relative, float64 < 1e-11 and float32 <
1e-4 for the stacks of 300 layers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dmup_kernels
from dmup_kernels import DepthMuPNet, ReferenceMLPBlock, ResidualMLPStack, param_groups, reference

from conftest import OP_BACKENDS, backend_device, rel_err
from parity import MLP_RESULTS, TOLERANCE, check_mlp_stack, mlp_outputs_and_grads, mlp_stack_kwargs
from sample_inputs import (
    MLP_STACK_LAYOUT_SPECS,
    MLP_STACK_SPECS,
    MlpStackSpec,
    make_mlp_stack_case,
)

DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["f64", "f32"]
BACKENDS = ["reference", *OP_BACKENDS]
DEEP_TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4}
"""docs/design.md §5.3: the tolerance of stacks deeper than 17 layers."""


def tolerance(spec: MlpStackSpec, dtype: torch.dtype) -> float:
    return (TOLERANCE if spec.depth <= 17 else DEEP_TOLERANCE)[dtype]


def backend_cases(specs: list[MlpStackSpec]) -> list:
    """pytest params (spec, backend): every spec on every backend, but triton takes only the specs of at most
    64 rows, width and hidden width <= 128 and depth <= 17 (the interpreter runs each program in Python)."""
    return [
        pytest.param(spec, backend, marks=param.marks, id=f"{spec.id}-{backend}")
        for spec in specs
        for param in OP_BACKENDS
        for backend in param.values
        if backend != "triton"
        or (math.prod(spec.batch_shape) <= 64 and max(spec.width, spec.hidden_width) <= 128 and spec.depth <= 17)
    ]


# ---------------------------------------------------------------------------------------------------
# 1. parity with the float64 reference, every backend
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec,backend", backend_cases(MLP_STACK_SPECS))
def test_matches_reference(spec: MlpStackSpec, backend, dtype, cpu_isa, seed):
    case = make_mlp_stack_case(spec, dtype, seed).to(backend_device(backend))
    check_mlp_stack(case, dtype, backend, tolerance(spec, dtype))


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec,backend", backend_cases(MLP_STACK_LAYOUT_SPECS))
def test_leading_dims_and_strided_x(spec: MlpStackSpec, backend, dtype, cpu_isa, seed):
    case = make_mlp_stack_case(spec, dtype, seed)
    assert case.x.is_contiguous() == (spec.layout == "contiguous")
    check_mlp_stack(case.to(backend_device(backend)), dtype, backend)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_strided_weights_and_biases(backend, seed):
    """Transposed weights and sliced biases are read by value, not by memory layout."""
    case = make_mlp_stack_case(MlpStackSpec(24, 40, 3, (21,), True, "gelu", True), torch.float64, seed)
    case.weight1 = case.weight1.transpose(1, 2).contiguous().transpose(1, 2)
    case.weight2 = case.weight2.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(3, 80, dtype=torch.float64)
    wide[:, ::2] = case.bias1
    case.bias1 = wide[:, ::2]
    assert not (case.weight1.is_contiguous() or case.weight2.is_contiguous() or case.bias1.is_contiguous())
    check_mlp_stack(case.to(backend_device(backend)), torch.float64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_states(backend, seed):
    case = make_mlp_stack_case(MlpStackSpec(16, 24, 4, (2, 5), True, "abs", True), torch.float64, seed)
    case = case.to(backend_device(backend))
    out, states = dmup_kernels.residual_mlp_stack(
        case.x, *case.params, **mlp_stack_kwargs(case), backend=backend, return_states=True
    )
    expected = reference.residual_mlp_stream(case.x, *case.params, **mlp_stack_kwargs(case))
    assert states.shape == (5, 2, 5, 16) and not states.requires_grad
    assert rel_err(states, torch.stack(expected)) < 1e-12 and torch.equal(states[-1], out)


# ---------------------------------------------------------------------------------------------------
# 2. the module, its conversions, DepthMuPNet and param_groups
# ---------------------------------------------------------------------------------------------------


def test_module_parameters_and_init(seed):
    stack = ResidualMLPStack(64, 256, 6, bias=True, dtype=torch.float64)
    shapes = {name: tuple(p.shape) for name, p in stack.named_parameters()}
    assert shapes == {"weight1": (6, 256, 64), "weight2": (6, 64, 256), "bias1": (6, 256), "bias2": (6, 64)}
    assert stack.weight1.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.05)  # muP: 1/fan_in
    assert stack.weight2.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert torch.equal(stack.bias1, torch.zeros(6, 256, dtype=torch.float64))
    assert stack.scale == pytest.approx(1 / math.sqrt(6)) and stack.mean_subtract is False
    assert "hidden_width=256" in repr(stack) and "bias=True" in repr(stack)
    assert ResidualMLPStack(4, 8, 2).bias1 is None and ResidualMLPStack(4, 8, 2).bias2 is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_the_function(backend, seed):
    stack = ResidualMLPStack(12, 20, 5, activation="silu", mean_subtract=True, bias=True, backend=backend)
    stack = stack.to(backend_device(backend))
    x = torch.randn(3, 12, device=backend_device(backend))
    expected = reference.residual_mlp_stack(
        x, stack.weight1, stack.weight2, stack.bias1, stack.bias2, scale=stack.scale, activation="silu",
        mean_subtract=True,
    )  # fmt: skip
    assert rel_err(stack(x), expected) < 1e-5


def pairs_of(stack: ResidualMLPStack) -> list[tuple[nn.Linear, nn.Linear]]:
    return [(block.linear1, block.linear2) for block in stack.to_reference_modules()]


@pytest.mark.parametrize("bias", [False, True])
def test_to_reference_modules_and_from_linears_round_trip(bias, seed):
    stack = ResidualMLPStack(10, 7, 4, activation="abs", mean_subtract=True, bias=bias, dtype=torch.float64)
    blocks = stack.to_reference_modules()
    assert len(blocks) == 4 and all(isinstance(block, ReferenceMLPBlock) for block in blocks)
    assert all(block.scale == stack.scale for block in blocks)
    x = torch.randn(5, 10, dtype=torch.float64)
    assert rel_err(blocks(x), stack(x)) < 1e-12
    back = ResidualMLPStack.from_linears(pairs_of(stack), activation="abs", mean_subtract=True)
    for name, param in stack.named_parameters():
        assert torch.equal(getattr(back, name), param), name
    assert torch.equal(back(x), stack(x))
    with torch.no_grad():
        blocks[0].linear1.weight.zero_()
    assert not torch.equal(stack.weight1[0], blocks[0].linear1.weight)  # copies


def test_from_linears_keeps_dtype_requires_grad_and_settings():
    pairs = [
        (nn.Linear(5, 9, bias=False, dtype=torch.float64), nn.Linear(9, 5, bias=False, dtype=torch.float64))
        for _ in range(3)
    ]
    for first, _ in pairs:
        first.requires_grad_(False)
    stack = ResidualMLPStack.from_linears(pairs, activation="gelu", total_depth=12, checkpoint=2)
    assert (stack.width, stack.hidden_width, stack.depth) == (5, 9, 3)
    assert stack.weight1.dtype == torch.float64 and not stack.weight1.requires_grad and stack.weight2.requires_grad
    assert stack.bias1 is None and stack.activation == "gelu" and stack.total_depth == 12 and stack.checkpoint == 2


@pytest.mark.parametrize(
    "pairs, error, match",
    [
        ([], ValueError, "pairs must hold at least one"),
        (nn.Linear(4, 8), TypeError, "pairs must be a sequence of"),
        ([nn.Linear(4, 8)], TypeError, r"pairs\[0\] must be a pair"),
        ([(nn.Linear(4, 8), nn.ReLU())], TypeError, r"pairs\[0\]\[1\] must be an nn.Linear; got ReLU"),
        (
            [(nn.Linear(4, 8), nn.Linear(8, 4)), (nn.Linear(4, 8), nn.Linear(8, 5))],
            ValueError,
            r"pairs\[1\] must be \(nn.Linear\(4, 8\), nn.Linear\(8, 4\)\) like pairs\[0\]",
        ),
        ([(nn.Linear(4, 8), nn.Linear(8, 4, bias=False))], ValueError, "all have a bias or all have none"),
        (
            [(nn.Linear(4, 8), nn.Linear(8, 4, dtype=torch.float64))],
            TypeError,
            r"pairs\[0\]\[1\].weight must have the dtype",
        ),
    ],
    ids=["empty", "one-linear", "not-a-pair", "not-linear", "shapes", "bias", "dtype"],
)
def test_from_linears_rejects_bad_pairs(pairs, error, match):
    with pytest.raises(error, match=match):
        ResidualMLPStack.from_linears(pairs)


def test_split_stages_compose_to_the_stack(seed):
    stack = ResidualMLPStack(8, 12, 5, bias=True, mean_subtract=True, checkpoint=2, dtype=torch.float64)
    stack.bias1.requires_grad_(False)
    stages = stack.split(2)
    assert [stage.depth for stage in stages] == [3, 2]
    assert all(stage.total_depth == 5 and stage.scale == stack.scale and stage.checkpoint == 2 for stage in stages)
    assert all(not stage.bias1.requires_grad and stage.hidden_width == 12 for stage in stages)
    for name, param in stack.named_parameters():
        assert torch.equal(torch.cat([getattr(stage, name) for stage in stages]), param), name
    x = torch.randn(4, 8, dtype=torch.float64)
    assert rel_err(nn.Sequential(*stages)(x), stack(x)) < 1e-12


def test_depth_mup_net_with_hidden_width(seed):
    net = DepthMuPNet(3, 16, 4, 2, hidden_width=40, activation="gelu", bias=True, dtype=torch.float64)
    assert isinstance(net.stack, ResidualMLPStack) and net.stack.hidden_width == 40
    out = net(torch.randn(5, 3, dtype=torch.float64))
    assert out.shape == (5, 2)
    groups = param_groups(net, lr=1.0)
    (stack_group,) = [g for g in groups if g["name"] == "stack"]
    assert {id(p) for p in stack_group["params"]} == {id(p) for p in net.stack.parameters()}
    assert stack_group["lr"] == pytest.approx(net.stack.parametrization.lr_scale(4, "adam"))
    with pytest.raises(TypeError, match="block"):
        DepthMuPNet(3, 16, 4, 2, hidden_width=40, block="pre")


# ---------------------------------------------------------------------------------------------------
# 3. torch.compile and torch.func on the module
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_and_func_grad(backend, seed):
    """torch.compile(fullgraph=True) and torch.func.grad give the eager reference's gradients, with and
    without checkpoints."""
    device = backend_device(backend)
    eager = ResidualMLPStack(8, 12, 4, bias=True, mean_subtract=True, backend="reference", dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, device=device)
    params = {name: p.detach().to(device) for name, p in eager.named_parameters()}

    def loss(params, module):
        return torch.func.functional_call(module, params, (x,)).square().sum()

    expected = torch.func.grad(loss)(params, eager.to(device))
    for checkpoint in (None, 3):
        stack = ResidualMLPStack(8, 12, 4, bias=True, mean_subtract=True, backend=backend, checkpoint=checkpoint)
        stack = stack.to(device, torch.float64)
        for name, value in torch.func.grad(loss)(params, stack).items():
            assert rel_err(value, expected[name]) < 1e-12, f"torch.func.grad: {name}"
        stack.load_state_dict(params)
        torch._dynamo.reset()
        compiled = torch.compile(stack, fullgraph=True)
        compiled(x).square().sum().backward()
        for name, p in stack.named_parameters():
            assert rel_err(p.grad, expected[name]) < 1e-12, f"torch.compile: {name}"


# ---------------------------------------------------------------------------------------------------
# 4. empty batch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_empty_batch(activation, backend):
    device = backend_device(backend)
    case = make_mlp_stack_case(MlpStackSpec(7, 9, 3, (0,), True, activation, True), torch.float32, 0).to(device)
    got = mlp_outputs_and_grads(case, torch.zeros(0, 7, device=device), backend)
    assert got[0].shape == (0, 7) and got[1].shape == (0, 7)
    for name, value, param in zip(MLP_RESULTS[2:], got[2:], case.params):
        assert torch.equal(value, torch.zeros_like(param)), name
