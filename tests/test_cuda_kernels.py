"""What is particular to backend="cuda", the CUDA C++ kernels (csrc/cuda): half types against the float64
eager reference on the CPU, returned states, the module, and the saved state against the CPU op's (one fake
rule and one backward contract serve both devices). Their float64/float32 parity on the op's shapes is tested
with every backend in test_scaled_residual.py and test_residual_stack.py. Needs a GPU and dmup_kernels._C
built with its CUDA kernels; skipped otherwise (tests/test_cuda_sources.py still compile-checks them).

The MLP stack (residual_mlp_stack): its saved state against the CPU op's, each device's backward on the
other's state, and half types.

Tolerance: bfloat16/float16 at most 2x the error of eager PyTorch in the same dtype plus 1e-3 (docs/design.md
§5.5).
"""

from __future__ import annotations

import math

import pytest
import torch

import dmup_kernels
from dmup_kernels import ResidualStack, reference

from conftest import needs_cuda, rel_err
from parity import MLP_RESULTS, check_within_twice_eager, mlp_outputs_and_grads, run_mlp_stack_reference, stack_kwargs
from sample_inputs import (
    ACTIVATIONS,
    BLOCKS,
    RESIDUAL_SPECS,
    MlpStackSpec,
    ResidualSpec,
    StackCase,
    StackSpec,
    make_mlp_stack_case,
    make_residual_case,
    make_stack_case,
    random_tensor,
)

pytestmark = [needs_cuda, pytest.mark.usefixtures("nan_poison")]

DEVICE = "cuda"
HALF_DTYPES = [torch.bfloat16, torch.float16]
GRAD_NAMES = ("output", "grad x", "grad weight", "grad bias")


def leaves(*tensors, device, dtype=None):
    """Fresh leaves that require grad, copied to ``device`` (and ``dtype``); None stays None."""
    return [None if t is None else t.detach().to(device, dtype).requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------------
# residual_stack: half types, returned states, the module
# ---------------------------------------------------------------------------------------------------


def stack_grads(case: StackCase, grad_out: torch.Tensor, backend: str, device, dtype) -> list:
    """Output and gradients (x, weight, bias) of ``backend`` on ``device`` in ``dtype``."""
    x, weight, bias = leaves(case.x, case.weight, case.bias, device=device, dtype=dtype)
    out = dmup_kernels.residual_stack(x, weight, bias, backend=backend, **stack_kwargs(case))
    out.backward(grad_out.to(device, dtype))
    return [out.detach(), x.grad, weight.grad, None if bias is None else bias.grad]


HALF_SPECS = [
    StackSpec(48, 3, (64,), "post", True, "relu", True, "contiguous"),
    StackSpec(64, 1, (5,), "pre", False, "gelu", False, "contiguous"),
    StackSpec(7, 3, (1,), "post", False, "abs", True, "contiguous"),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("spec", HALF_SPECS, ids=[s.id for s in HALF_SPECS])
def test_stack_half_types_within_twice_eager_error(spec: StackSpec, dtype, seed):
    """Half types in and out (the kernels run a float32 stream): error <= 2x eager's in the dtype + 1e-3."""
    case = make_stack_case(spec, dtype, seed)
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    got = stack_grads(case, grad_out, "cuda", DEVICE, dtype)
    eager = stack_grads(case, grad_out, "reference", DEVICE, dtype)
    expected = stack_grads(case, grad_out, "reference", "cpu", torch.float64)
    check_within_twice_eager(GRAD_NAMES, got, eager, expected, dtype)


def test_stack_return_states(seed):
    case = make_stack_case(StackSpec(48, 3, (5,), "post", True, "abs", True, "contiguous"), torch.float64, seed)
    x, weight, bias = (None if t is None else t.to(DEVICE) for t in (case.x, case.weight, case.bias))
    out, states = dmup_kernels.residual_stack(x, weight, bias, backend="cuda", return_states=True, **stack_kwargs(case))
    expected = reference.residual_stream(case.x, case.weight, case.bias, **stack_kwargs(case))
    assert states.shape == (4, 5, 48)
    assert rel_err(out, expected[-1]) < 1e-12
    assert rel_err(states, torch.stack(expected)) < 1e-12


def test_module_runs_the_cuda_kernels(seed):
    torch.manual_seed(seed)
    module = ResidualStack(48, 3, activation="gelu", bias=True, backend="cuda").to(DEVICE, torch.float64)
    peer = ResidualStack(48, 3, activation="gelu", bias=True, backend="reference").to(DEVICE, torch.float64)
    peer.load_state_dict(module.state_dict())
    x = torch.randn(6, 48, dtype=torch.float64, device=DEVICE)
    out, ref = module(x), peer(x)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-12
    for (name, p), q in zip(module.named_parameters(), peer.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-12, name


# ---------------------------------------------------------------------------------------------------
# the op's state: the CPU layout exactly, so either device's backward takes either device's state
# ---------------------------------------------------------------------------------------------------


def op_args(activation: str, block: str, *, batch: int = 37, width: int = 20, depth: int = 4, bias: bool = True):
    """CPU float64 arguments of dmup::residual_stack; 37 rows fill 3 mask words and 2 warps of rows."""
    generator = torch.Generator().manual_seed(batch * width + depth)
    x = random_tensor((batch, width), torch.float64, generator)
    weight = random_tensor((depth, width, width), torch.float64, generator) / math.sqrt(width)
    b = 0.1 * random_tensor((depth, width), torch.float64, generator) if bias else None
    return x, weight, b, depth**-0.5, activation, block, True


def to_device(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_state_matches_cpu_op(activation, block):
    args = op_args(activation, block)
    out, saved, mask = torch.ops.dmup.residual_stack(*to_device(args, DEVICE), True)
    cpu_out, cpu_saved, cpu_mask = torch.ops.dmup.residual_stack(*args, True)
    assert saved.shape == cpu_saved.shape and mask.shape == cpu_mask.shape and mask.dtype == torch.int16
    assert rel_err(out, cpu_out) < 1e-13
    assert rel_err(saved, cpu_saved) < 1e-13
    assert torch.equal(mask.cpu(), cpu_mask)  # same sign bits, and 0 for the rows past the batch

    x, weight, bias, *settings = args
    grad_out = torch.randn_like(x)
    expected = torch.ops.dmup.residual_stack_backward(grad_out, cpu_saved, cpu_mask, weight, bias, *settings)
    for state in ((saved, mask), (cpu_saved.to(DEVICE), cpu_mask.to(DEVICE))):
        got = torch.ops.dmup.residual_stack_backward(*to_device((grad_out, *state, weight, bias), DEVICE), *settings)
        for name, value, ref in zip(GRAD_NAMES[1:], got, expected):
            assert value.device.type == "cuda" and rel_err(value, ref) < 1e-12, name


@pytest.mark.parametrize("activation", ["relu", "abs", "gelu"])
def test_inference_saves_nothing(activation):
    args = to_device(op_args(activation, "post"), DEVICE)
    out, saved, mask = torch.ops.dmup.residual_stack(*args, False)
    trained, _, _ = torch.ops.dmup.residual_stack(*args, True)
    planes = {"relu": 1, "abs": 2}.get(activation, 0)
    assert saved.shape == (0, 20, 37) and mask.shape == (0, planes, 20, 3)
    assert torch.equal(out, trained)


def test_empty_batch_direct_op():
    x, weight, bias, *settings = to_device(op_args("relu", "post", batch=0, width=7, depth=3), DEVICE)
    out, saved, mask = torch.ops.dmup.residual_stack(x, weight, bias, *settings, True)
    assert out.shape == (0, 7) and saved.shape == (3, 7, 0) and mask.shape == (3, 1, 7, 0)
    grad_x, grad_weight, grad_bias = torch.ops.dmup.residual_stack_backward(x, saved, mask, weight, bias, *settings)
    assert grad_x.shape == (0, 7)
    assert torch.equal(grad_weight, torch.zeros_like(weight)) and torch.equal(grad_bias, torch.zeros_like(bias))


def test_backward_op_rejects_bad_state():
    x, weight, bias, scale, _, block, mean_subtract = to_device(op_args("relu", "post"), DEVICE)
    _, saved, mask = torch.ops.dmup.residual_stack(x, weight, bias, scale, "relu", block, mean_subtract, True)
    with pytest.raises(ValueError, match="mask"):  # relu's 1 plane where abs needs 2
        torch.ops.dmup.residual_stack_backward(x, saved, mask, weight, bias, scale, "abs", block, mean_subtract)
    with pytest.raises(ValueError, match="saved"):  # the state on another device
        torch.ops.dmup.residual_stack_backward(x, saved.cpu(), mask, weight, bias, scale, "relu", block, mean_subtract)


OPCHECK_CASES = [("relu", "post", True), ("gelu", "pre", False), ("abs", "post", False), ("silu", "post", True)]


@pytest.mark.parametrize("activation,block,bias", OPCHECK_CASES, ids=["-".join(map(str, c)) for c in OPCHECK_CASES])
def test_opcheck(activation, block, bias):
    x, weight, b, *settings = op_args(activation, block, batch=17, width=9, depth=2, bias=bias)
    x, weight, b = leaves(x, weight, b, device=DEVICE)
    torch.library.opcheck(torch.ops.dmup.residual_stack.default, (x, weight, b, *settings, True))


# ---------------------------------------------------------------------------------------------------
# scaled_residual
# ---------------------------------------------------------------------------------------------------


def residual_grads(case, grad_out: torch.Tensor, backend: str, device, dtype) -> list:
    x, branch_out = leaves(case.x, case.branch_out, device=device, dtype=dtype)
    out = dmup_kernels.scaled_residual(x, branch_out, case.scale, case.activation, case.mean_subtract, backend=backend)
    out.backward(grad_out.to(device, dtype))
    return [out.detach(), x.grad, branch_out.grad]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("spec", RESIDUAL_SPECS[::5], ids=[s.id for s in RESIDUAL_SPECS[::5]])
def test_scaled_residual_half_types_within_twice_eager_error(spec: ResidualSpec, dtype, seed):
    case = make_residual_case(spec, dtype, seed)
    grad_out = torch.randn(spec.shape, dtype=dtype)
    got = residual_grads(case, grad_out, "cuda", DEVICE, dtype)
    eager = residual_grads(case, grad_out, "reference", DEVICE, dtype)
    expected = residual_grads(case, grad_out, "reference", "cpu", torch.float64)
    check_within_twice_eager(("output", "grad x", "grad branch_out"), got, eager, expected, dtype)


# ---------------------------------------------------------------------------------------------------
# residual_mlp_stack: the saved state against the CPU op's, half types
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint_every", [0, 2])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_state_matches_cpu_op(activation, checkpoint_every, seed):
    """The same saved state and sign bits as the CPU op (37 rows: a partial mask word), and either device's
    backward on either device's state gives the CPU op's gradients."""
    case = make_mlp_stack_case(MlpStackSpec(20, 27, 5, (37,), True, activation, True), torch.float64, seed)
    settings = (case.scale, activation, True)
    cpu = torch.ops.dmup.residual_mlp_stack(case.x, *case.params, *settings, True, checkpoint_every)
    gpu = torch.ops.dmup.residual_mlp_stack(
        *to_device((case.x, *case.params), DEVICE), *settings, True, checkpoint_every
    )
    assert rel_err(gpu[0], cpu[0]) < 1e-13 and rel_err(gpu[1], cpu[1]) < 1e-13
    assert gpu[2].shape == cpu[2].shape and torch.equal(gpu[2].cpu(), cpu[2])
    grad_out = torch.randn_like(case.x)
    expected = torch.ops.dmup.residual_mlp_stack_backward(grad_out, *cpu[1:], *case.params, *settings, checkpoint_every)
    for state in (gpu[1:], to_device(cpu[1:], DEVICE)):
        got = torch.ops.dmup.residual_mlp_stack_backward(
            *to_device((grad_out, *state, *case.params), DEVICE), *settings, checkpoint_every
        )
        for name, value, ref in zip(MLP_RESULTS[1:], got, expected):
            assert value.device.type == "cuda" and rel_err(value, ref) < 1e-12, name


MLP_HALF_SPECS = [
    MlpStackSpec(32, 128, 3, (64,), True, "relu", False),
    MlpStackSpec(7, 5, 2, (5,), False, "gelu", True),
    MlpStackSpec(64, 256, 1, (1,), True, "abs", True),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("spec", MLP_HALF_SPECS, ids=[s.id for s in MLP_HALF_SPECS])
def test_mlp_half_types_within_twice_eager_error(spec: MlpStackSpec, dtype, seed):
    case = make_mlp_stack_case(spec, dtype, seed)
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    got = mlp_outputs_and_grads(case.to(DEVICE), grad_out.to(DEVICE), "cuda")
    eager = run_mlp_stack_reference(case, grad_out, dtype)
    expected = run_mlp_stack_reference(case, grad_out)
    check_within_twice_eager(MLP_RESULTS, got, eager, expected, dtype)
