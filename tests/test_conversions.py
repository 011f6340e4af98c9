"""Moving between plain layers and ResidualStack, and cutting a stack into pipeline stages:
``ResidualStack.from_linears`` / ``to_reference_modules`` / ``split``, ``ReferenceBlock``, ``total_depth``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmup_kernels
from dmup_kernels import COMPLETE_P, ReferenceBlock, ResidualStack, param_groups, reference

from conftest import rel_err
from sample_inputs import STACK_SPECS, StackCase, StackSpec, make_stack_case

BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not dmup_kernels.HAS_CPP, reason="no C++"))]
SPECS = [spec for spec in STACK_SPECS if spec.depth in (2, 17)]  # post/pre x bias/no bias, two depths
SPEC_IDS = [spec.id for spec in SPECS]


def settings(spec: StackSpec) -> dict:
    return {"activation": spec.activation, "block": spec.block, "mean_subtract": spec.mean_subtract}


def stack_of(case: StackCase, backend: str) -> ResidualStack:
    """A stack holding the case's weights (float32), with the case's settings."""
    spec = case.spec
    stack = ResidualStack(spec.width, spec.depth, bias=spec.bias, backend=backend, **settings(spec))
    with torch.no_grad():
        stack.weight.copy_(case.weight)
        if case.bias is not None:
            stack.bias.copy_(case.bias)
    return stack


def reference_output(case: StackCase, x: torch.Tensor) -> torch.Tensor:
    """The float64 reference of the case's stack on ``x`` (scale 1/sqrt(depth))."""
    bias = None if case.bias is None else case.bias.double()
    return reference.residual_stack(x.double(), case.weight.double(), bias, scale=case.scale, **settings(case.spec))


def reference_gradients(case: StackCase, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Float64 reference: the output and the gradients wrt x, weight (and bias) for ``grad_out``."""
    leaves = [t.double().requires_grad_() for t in (case.x, case.weight, case.bias) if t is not None]
    bias = leaves[2] if case.bias is not None else None
    out = reference.residual_stack(leaves[0], leaves[1], bias, scale=case.scale, **settings(case.spec))
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))


def make_case(seed: int, spec: StackSpec) -> StackCase:
    return make_stack_case(spec, torch.float32, seed)


# ---------------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_split_stages_compose_to_the_stack(spec: StackSpec, backend, seed):
    case = make_case(seed, spec)
    stack = stack_of(case, backend)
    grad_out = torch.randn(case.x.shape)
    ref_out, *ref_grads = reference_gradients(case, grad_out)
    for num_stages in sorted({1, 2, 3, spec.depth} & set(range(1, spec.depth + 1))):
        stages = stack.split(num_stages)
        depths = [stage.depth for stage in stages]
        assert sum(depths) == spec.depth and depths == sorted(depths, reverse=True) and depths[0] - depths[-1] <= 1
        assert all(stage.total_depth == spec.depth and stage.scale == stack.scale for stage in stages)
        x = case.x.detach().clone().requires_grad_()
        out = nn.Sequential(*stages)(x)
        out.backward(grad_out)
        grads = [x.grad, torch.cat([stage.weight.grad for stage in stages])]
        if spec.bias:
            grads.append(torch.cat([stage.bias.grad for stage in stages]))
        assert rel_err(out, ref_out) < 1e-5
        for name, got, expected in zip(("x", "weight", "bias"), grads, ref_grads):
            assert rel_err(got, expected) < 1e-5, (num_stages, name)


def test_split_copies_parameters_with_their_settings():
    stack = ResidualStack(6, 5, activation="abs", block="pre", bias=True, parametrization=COMPLETE_P,
                          backend="reference", dtype=torch.float64)  # fmt: skip
    stack.bias.requires_grad_(False)
    first, second = stack.split(2)
    assert (first.depth, second.depth) == (3, 2)
    assert torch.equal(torch.cat([first.weight, second.weight]), stack.weight)
    assert torch.equal(torch.cat([first.bias, second.bias]), stack.bias)
    for stage in (first, second):
        assert (stage.activation, stage.block, stage.backend, stage.parametrization) == (
            "abs",
            "pre",
            "reference",
            COMPLETE_P,
        )
        assert stage.weight.dtype == torch.float64 and stage.weight.requires_grad and not stage.bias.requires_grad
    with torch.no_grad():
        first.weight.add_(1.0)
    assert not torch.equal(first.weight, stack.weight[:3])  # copies: the stack is unchanged


@pytest.mark.parametrize(
    "num_stages, error, match",
    [(0, ValueError, "num_stages must be an int >= 1"), (6, ValueError, r"num_stages must be at most depth \(5\)"),
     (2.0, TypeError, "num_stages must be an int"), (True, TypeError, "num_stages must be an int")],
)  # fmt: skip
def test_split_rejects_bad_num_stages(num_stages, error, match):
    with pytest.raises(error, match=match):
        ResidualStack(4, 5).split(num_stages)


def test_total_depth_sets_scale_and_learning_rate():
    stack = ResidualStack(4, 3, total_depth=12)
    assert stack.total_depth == 12 and stack.scale == pytest.approx(1 / math.sqrt(12), rel=1e-12)
    assert "total_depth=12" in repr(stack)
    assert ResidualStack(4, 3).total_depth == 3
    whole = ResidualStack(4, 12)
    (group,) = param_groups(stack, lr=1.0)
    (whole_group,) = param_groups(whole, lr=1.0)
    assert group["lr"] == pytest.approx(whole_group["lr"]) == pytest.approx(1 / math.sqrt(12))
    with pytest.raises(ValueError, match=r"total_depth must be >= depth \(3\)"):
        ResidualStack(4, 3, total_depth=2)
    with pytest.raises(TypeError, match="total_depth must be an int"):
        ResidualStack(4, 3, total_depth=3.0)


# ---------------------------------------------------------------------------------------------------
# from_linears / to_reference_modules / ReferenceBlock
# ---------------------------------------------------------------------------------------------------


def linears_of(case: StackCase) -> list[nn.Linear]:
    layers = []
    for index in range(case.spec.depth):
        layer = nn.Linear(case.spec.width, case.spec.width, bias=case.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(case.weight[index])
            if case.bias is not None:
                layer.bias.copy_(case.bias[index])
        layers.append(layer)
    return layers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_from_linears_copies_the_layers(spec: StackSpec, backend, seed):
    case = make_case(seed, spec)
    linears = linears_of(case)
    stack = ResidualStack.from_linears(linears, backend=backend, **settings(spec))
    assert (stack.width, stack.depth, stack.bias is not None) == (spec.width, spec.depth, spec.bias)
    assert torch.equal(stack.weight, case.weight) and (not spec.bias or torch.equal(stack.bias, case.bias))
    assert rel_err(stack(case.x), reference_output(case, case.x)) < 1e-5
    with torch.no_grad():
        linears[0].weight.zero_()
    assert torch.equal(stack.weight[0], case.weight[0])  # a copy
    # any iterable of layers: a ModuleList, a Sequential, a generator
    for layers in (nn.ModuleList(linears), nn.Sequential(*linears), (layer for layer in linears)):
        assert ResidualStack.from_linears(layers, backend=backend).depth == spec.depth


def test_from_linears_keeps_dtype_device_requires_grad_and_settings():
    linears = [nn.Linear(5, 5, bias=False, dtype=torch.float64).requires_grad_(False) for _ in range(3)]
    stack = ResidualStack.from_linears(linears, block="pre", parametrization=COMPLETE_P, total_depth=9)
    assert stack.weight.dtype == torch.float64 and not stack.weight.requires_grad and stack.bias is None
    assert stack.block == "pre" and stack.total_depth == 9 and stack.scale == pytest.approx(1 / 9)


@pytest.mark.parametrize(
    "linears, error, match",
    [
        ([], ValueError, "at least one nn.Linear"),
        (nn.Linear(4, 4), TypeError, "sequence of nn.Linear; got Linear"),
        (torch.zeros(2, 4, 4), TypeError, "sequence of nn.Linear; got Tensor"),
        ([nn.Linear(4, 4), nn.ReLU()], TypeError, r"linears\[1\] must be an nn.Linear; got ReLU"),
        ([nn.Linear(4, 3)], ValueError, r"linears\[0\] must be square, nn.Linear\(n, n\); got nn.Linear\(4, 3\)"),
        ([nn.Linear(4, 4), nn.Linear(5, 5)], ValueError, r"one width; linears\[0\] has 4, linears\[1\] has 5"),
        ([nn.Linear(4, 4), nn.Linear(4, 4, bias=False)], ValueError, r"all have a bias or all have none"),
        (
            [nn.Linear(4, 4), nn.Linear(4, 4, dtype=torch.float64)],
            TypeError,
            r"linears\[1\].weight must have the dtype",
        ),
    ],
    ids=["empty", "one-linear", "tensor", "not-linear", "not-square", "widths", "bias", "dtype"],
)
def test_from_linears_rejects_bad_layers(linears, error, match):
    with pytest.raises(error, match=match):
        ResidualStack.from_linears(linears)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_to_reference_modules_round_trip(spec: StackSpec, backend, seed):
    case = make_case(seed, spec)
    stack = stack_of(case, backend)
    blocks = stack.to_reference_modules()
    assert isinstance(blocks, nn.Sequential) and len(blocks) == spec.depth
    assert all(isinstance(block, ReferenceBlock) and block.scale == stack.scale for block in blocks)
    assert all(torch.equal(block.linear.weight, stack.weight[i]) for i, block in enumerate(blocks))

    x = case.x.detach().clone().requires_grad_()
    out = blocks(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref_dx, ref_dweight, *_ = reference_gradients(case, grad_out)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(x.grad, ref_dx) < 1e-5
    assert rel_err(torch.stack([block.linear.weight.grad for block in blocks]), ref_dweight) < 1e-5

    back = ResidualStack.from_linears([block.linear for block in blocks], backend=backend, **settings(spec))
    assert torch.equal(back.weight, stack.weight) and (not spec.bias or torch.equal(back.bias, stack.bias))
    assert torch.equal(back(case.x), stack(case.x))


@pytest.mark.parametrize("block", ["post", "pre"])
def test_reference_block_is_the_block_formula(block):
    module = ReferenceBlock(6, scale=0.3, activation="silu", block=block, mean_subtract=True, bias=True,
                            dtype=torch.float64)  # fmt: skip
    with torch.no_grad():
        module.linear.bias.normal_()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    branch = F.silu(module.linear(x)) if block == "post" else module.linear(F.silu(x))
    expected = x + 0.3 * (branch - branch.mean(dim=-1, keepdim=True))
    assert rel_err(module(x), expected) < 1e-14
    assert module.linear.weight.std().item() == pytest.approx(1 / math.sqrt(6), rel=0.5)  # muP init
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\)"):
        module(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="scale must be a real number"):
        ReferenceBlock(6, scale="0.3")
