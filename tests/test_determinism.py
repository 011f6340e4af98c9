"""Determinism of the CPU path: the same inputs give bitwise the same outputs (and gradients) for any
number of threads, on every call, and in a fresh process, on every instruction set this CPU runs. (The
fused stack op's gradients across thread counts: test_residual_stack.py,
test_bitwise_independent_of_threads.)

DepthMuPNet's input and output layers are torch's nn.Linear, whose BLAS GEMMs are not promised to be
independent of the thread count; the net is checked call to call at a fixed thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dmup_kernels
from dmup_kernels import DepthMuPNet, ResidualMLPStack, ResidualStack, ScaledResidual

from conftest import num_threads
from sample_inputs import (
    PARALLEL_SHAPES,
    MlpStackSpec,
    ResidualSpec,
    StackSpec,
    make_mlp_stack_case,
    make_residual_case,
    make_stack_case,
)

pytestmark = [
    pytest.mark.usefixtures("nan_poison"),
    pytest.mark.skipif(not dmup_kernels.HAS_CPP, reason="C++ extension not built"),
]

TESTS = Path(__file__).resolve().parent


def outputs_and_grads(fn, inputs: list[torch.Tensor], params: list[torch.Tensor], grad_seed: int) -> list[torch.Tensor]:
    """fn(*fresh leaves) and the gradients of every input and parameter for a fixed random grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    for param in params:
        param.grad = None
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(grad_out)
    return [out.detach()] + [leaf.grad for leaf in leaves] + [param.grad.clone() for param in params]


MORE_THREADS_THAN_CORES = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
) + 1
"""A team the cores cannot all run at once: its threads wait at barriers and in the gradient chain for threads
that are not running."""


def assert_bitwise_across_threads(fn, inputs, params=(), grad_seed=0) -> None:
    with num_threads(1):
        one = outputs_and_grads(fn, inputs, list(params), grad_seed)
    with num_threads(2):
        two = outputs_and_grads(fn, inputs, list(params), grad_seed)
        again = outputs_and_grads(fn, inputs, list(params), grad_seed)
    with num_threads(MORE_THREADS_THAN_CORES):
        many = outputs_and_grads(fn, inputs, list(params), grad_seed)
    for index, (a, b, c, d) in enumerate(zip(one, two, again, many)):
        assert torch.equal(a, b), f"result {index}: 1 thread != 2 threads"
        assert torch.equal(b, c), f"result {index}: two calls differ"
        assert torch.equal(a, d), f"result {index}: 1 thread != {MORE_THREADS_THAN_CORES} threads (more than cores)"


SCALED_RESIDUAL_SPECS = [
    ResidualSpec(PARALLEL_SHAPES[0], "contiguous", "silu", True, 0.7),
    ResidualSpec(PARALLEL_SHAPES[1], "transposed", "abs", True, -0.75),
]


# float32 and float64 share the kernel's code; bfloat16 computes in float32 and rounds on store
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("spec", SCALED_RESIDUAL_SPECS, ids=[s.id for s in SCALED_RESIDUAL_SPECS])
def test_scaled_residual_bitwise_across_threads(spec: ResidualSpec, dtype, seed):
    """Enough rows that the kernel splits them over several parallel tasks."""
    case = make_residual_case(spec, dtype, seed)

    def fn(x, branch_out):
        return dmup_kernels.scaled_residual(x, branch_out, spec.scale, spec.activation, spec.mean_subtract,
                                            backend="cpp")  # fmt: skip

    assert_bitwise_across_threads(fn, [case.x, case.branch_out], grad_seed=seed)


@pytest.mark.parametrize(
    "batch,width,block,activation",
    [(1000, 96, "post", "abs"), (3, 96, "post", "relu"), (200, 96, "pre", "silu"), (3, 2, "post", "gelu")],
    ids=["row-split", "feature-split", "pre", "fewer-features-than-threads"],
)
def test_residual_stack_module_bitwise_across_threads(batch, width, block, activation, cpu_isa, seed):
    torch.manual_seed(seed)
    module = ResidualStack(width, 17, activation=activation, block=block, bias=True, backend="auto")
    x = torch.randn(batch, width)
    assert_bitwise_across_threads(module, [x], module.parameters(), grad_seed=seed)


@pytest.mark.parametrize("batch", [200, 3], ids=["row-split", "feature-split"])
def test_residual_mlp_stack_module_bitwise_across_threads(batch, cpu_isa, seed):
    torch.manual_seed(seed)
    module = ResidualMLPStack(40, 72, 9, activation="relu", mean_subtract=True, bias=True, backend="auto")
    x = torch.randn(batch, 40)
    assert_bitwise_across_threads(module, [x], module.parameters(), grad_seed=seed)


def test_scaled_residual_module_bitwise_across_threads(seed):
    module = ScaledResidual(nn.Tanh(), 0.3, "gelu", True, backend="auto")  # an elementwise branch
    assert_bitwise_across_threads(module, [torch.randn(4000, 7)], grad_seed=seed)


def test_net_bitwise_call_to_call(seed):
    torch.manual_seed(seed)
    net = DepthMuPNet(16, 48, 33, 10, activation="relu", bias=True)
    x = torch.randn(300, 16)
    with num_threads(2):
        first = outputs_and_grads(net, [x], list(net.parameters()), seed)
        second = outputs_and_grads(net, [x], list(net.parameters()), seed)
    for index, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {index}: two calls differ"


# ---------------------------------------------------------------------------------------------------
# a fresh process, with another thread count, computes bitwise the same forward
# ---------------------------------------------------------------------------------------------------

PROCESS_STACK_SPECS = [
    StackSpec(48, 5, (1000,), "post", True, "relu", True, "contiguous"),  # micro-kernel, row tiles
    StackSpec(96, 17, (3,), "post", False, "abs", False, "transposed"),  # feature split
    StackSpec(256, 2, (40,), "pre", True, "gelu", True, "contiguous"),  # wide: the tile size varies with threads
]


PROCESS_MLP_STACK_SPECS = [
    MlpStackSpec(32, 96, 3, (1000,), True, "relu", False),  # row tiles
    MlpStackSpec(20, 48, 4, (3,), False, "abs", True),  # feature split
]


def forward_digests(threads: int) -> dict[str, str]:
    """SHA-256 of the forward outputs of residual_stack, residual_mlp_stack and scaled_residual (backend "cpp")
    on fixed inputs, computed with ``threads`` threads."""
    digests = {"cpu_isa": dmup_kernels.cpu_isa()}
    with num_threads(threads), torch.no_grad():
        for index, spec in enumerate(PROCESS_STACK_SPECS):
            case = make_stack_case(spec, torch.float32, 1000 + index)
            out = dmup_kernels.residual_stack(case.x, case.weight, case.bias, scale=case.scale,
                                              activation=spec.activation, block=spec.block,
                                              mean_subtract=spec.mean_subtract, backend="cpp")  # fmt: skip
            digests[spec.id] = hashlib.sha256(out.numpy().tobytes()).hexdigest()
        for index, spec in enumerate(PROCESS_MLP_STACK_SPECS):
            case = make_mlp_stack_case(spec, torch.float32, 3000 + index)
            out = dmup_kernels.residual_mlp_stack(case.x, *case.params, scale=case.scale, activation=spec.activation,
                                                  mean_subtract=spec.mean_subtract, backend="cpp")  # fmt: skip
            digests[spec.id] = hashlib.sha256(out.numpy().tobytes()).hexdigest()
        for index, spec in enumerate(SCALED_RESIDUAL_SPECS):
            case = make_residual_case(spec, torch.float32, 2000 + index)
            out = dmup_kernels.scaled_residual(*case.args(), backend="cpp")
            digests[spec.id] = hashlib.sha256(out.numpy().tobytes()).hexdigest()
    return digests


def test_forward_bitwise_in_a_fresh_process(cpu_isa):
    """Another interpreter (its own allocations, its own thread pool), pinned to the same instruction set
    by DMUP_CPU_ISA, with 2 threads gives the digests this one computes with 1."""
    script = f"import json, sys; sys.path.insert(0, {str(TESTS)!r}); from test_determinism import forward_digests; " \
             "print(json.dumps(forward_digests(2)))"  # fmt: skip
    env = dict(os.environ, DMUP_CPU_ISA=cpu_isa,
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=TESTS.parent, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    other = json.loads(result.stdout.strip().splitlines()[-1])
    assert other == forward_digests(1)
