"""Depth checkpointing (``checkpoint=`` of residual_stack and ResidualStack, docs/design.md §4.4).

- cpp: output and every gradient bitwise equal to ``checkpoint=None`` on every instruction set, for every
  activation, block, MS and bias setting, and k = 1, k = L, k > L, k not dividing L and "sqrt"; also with
  several row tiles, and independent of the thread count;
- cuda, triton (interpreter on the CPU) and reference: within 1e-12 of their own save-all path in float64;
- memory: the bytes autograd saves are at most (ceil(L/k) + 1) B n elements plus a small constant, and the
  peak memory of the backward (in a subprocess) grows by at most the gradients plus two segments of state;
- the API: argument checks, the modules keep the setting through split() and from_linears().
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import dmup_kernels
from dmup_kernels import DepthMuPNet, ResidualStack

from conftest import REPO, backend_device, needs_cpp, needs_cuda, needs_triton, num_threads, rel_err, saved_bytes
from parity import stack_kwargs
from sample_inputs import ACTIVATIONS, BLOCKS, StackCase, StackSpec, make_stack_case

DEPTH = 7
CHECKPOINTS = (1, 2, 3, DEPTH, DEPTH + 4, "sqrt")  # 1, dividing none of L, L itself, more than L, ceil(sqrt(7)) = 3
SETTINGS = list(itertools.product(ACTIVATIONS, BLOCKS, (True, False), (False, True)))
SETTING_IDS = [f"{a}-{b}-{'ms' if ms else 'noms'}-{'bias' if bias else 'nobias'}" for a, b, ms, bias in SETTINGS]


def outputs_and_grads(case: StackCase, grad_out: torch.Tensor, backend: str, checkpoint) -> list[torch.Tensor]:
    """Output and gradients of x, weight (and bias) from fresh leaves."""
    x = case.x.detach().clone().requires_grad_()
    weight = case.weight.detach().clone().requires_grad_()
    bias = None if case.bias is None else case.bias.detach().clone().requires_grad_()
    out = dmup_kernels.residual_stack(x, weight, bias, backend=backend, checkpoint=checkpoint, **stack_kwargs(case))
    out.backward(grad_out)
    return [out.detach(), x.grad, weight.grad] + ([] if bias is None else [bias.grad])


def assert_bitwise_equal(got: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), got, expected):
        assert torch.equal(a, b), f"{name} with {what} differs from saving every layer"


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation,block,mean_subtract,bias", SETTINGS, ids=SETTING_IDS)
def test_cpp_bitwise_equal_to_saving_every_layer(activation, block, mean_subtract, bias, dtype, cpu_isa, seed):
    spec = StackSpec(24, DEPTH, (37,), block, bias, activation, mean_subtract, "contiguous")
    case = make_stack_case(spec, dtype, seed)
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    save_all = outputs_and_grads(case, grad_out, "cpp", None)
    for checkpoint in CHECKPOINTS:
        assert_bitwise_equal(outputs_and_grads(case, grad_out, "cpp", checkpoint), save_all, f"checkpoint={checkpoint}")


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize(
    "spec",
    [
        StackSpec(64, 10, (2000,), "post", True, "relu", True, "contiguous"),  # several row tiles per thread
        StackSpec(96, 9, (3,), "pre", False, "silu", True, "contiguous"),  # threads share one tile's features
        StackSpec(256, 5, (40,), "post", True, "abs", False, "contiguous"),  # wide
    ],
    ids=lambda spec: spec.id,
)
def test_cpp_bitwise_equal_for_any_thread_count(spec, cpu_isa, seed):
    case = make_stack_case(spec, torch.float32, seed)
    grad_out = torch.randn(case.x.shape)
    with num_threads(2):
        save_all = outputs_and_grads(case, grad_out, "cpp", None)
    for threads in (1, 2):
        with num_threads(threads):
            got = outputs_and_grads(case, grad_out, "cpp", 4)
        assert_bitwise_equal(got, save_all, f"checkpoint=4 on {threads} thread(s)")


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=needs_cuda)]
)
@pytest.mark.parametrize("activation,block", [("relu", "post"), ("abs", "post"), ("gelu", "post"), ("silu", "pre")])
def test_other_backends_checkpoints_match_their_save_all_path(backend, activation, block, seed):
    """cuda recomputes segments in its host loop; triton and the reference, which have no checkpoints of
    their own, with torch.utils.checkpoint. Either way, equal to their own save-all path to rounding."""
    spec = StackSpec(16, DEPTH, (9,), block, True, activation, True, "contiguous")
    case = make_stack_case(spec, torch.float64, seed).to(backend_device(backend))
    grad_out = torch.randn(case.x.shape, dtype=torch.float64).to(case.x.device)
    save_all = outputs_and_grads(case, grad_out, backend, None)
    for checkpoint in (1, 3, "sqrt", DEPTH + 1):
        got = outputs_and_grads(case, grad_out, backend, checkpoint)
        for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), got, save_all):
            assert rel_err(a, b) < 1e-12, f"{name} with checkpoint={checkpoint}"


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
)
def test_compile_and_func_grad_with_checkpoints(backend, seed):
    """torch.compile(fullgraph=True) and torch.func.grad give the gradients of saving every layer."""
    stack = ResidualStack(16, 7, bias=True, backend=backend, checkpoint=3, dtype=torch.float64)
    stack = stack.to(backend_device(backend))
    x = torch.randn(5, 16, dtype=torch.float64, device=backend_device(backend))
    params = {name: p.detach() for name, p in stack.named_parameters()}

    def loss(params, module):
        return torch.func.functional_call(module, params, (x,)).square().sum()

    save_all = torch.func.grad(loss)(params, ResidualStack(16, 7, bias=True, backend=backend).to(x))
    for name, value in torch.func.grad(loss)(params, stack).items():
        assert rel_err(value, save_all[name]) < 1e-12, f"torch.func.grad: {name}"
    torch._dynamo.reset()
    compiled = torch.compile(stack, fullgraph=True)
    compiled(x).square().sum().backward()
    for name, p in stack.named_parameters():
        assert rel_err(p.grad, save_all[name]) < 1e-12, f"torch.compile: {name}"


@needs_cpp
@pytest.mark.parametrize("checkpoint,depth", [(1, 6), (4, 17), (5, 5), (9, 4), ("sqrt", 30)])
@pytest.mark.parametrize("activation", ["relu", "abs", "gelu"])
def test_saved_bytes_are_the_checkpoints(checkpoint, depth, activation, seed):
    """At most (ceil(L/k) + 1) B n elements (the checkpoints, and the output an autograd caller may keep)
    plus a constant, and no sign bits."""
    batch, width = 37, 24
    x = torch.randn(batch, width, requires_grad=True)
    weight = (torch.randn(depth, width, width) / math.sqrt(width)).requires_grad_()
    bias = (0.1 * torch.randn(depth, width)).requires_grad_()
    every = math.isqrt(depth - 1) + 1 if checkpoint == "sqrt" else checkpoint

    def run(checkpoint):
        return lambda: dmup_kernels.residual_stack(
            x, weight, bias, scale=0.3, activation=activation, backend="cpp", checkpoint=checkpoint
        )

    saved = saved_bytes(run(checkpoint), exclude=[weight, bias])
    checkpoints = -(-depth // every)
    assert checkpoints * batch * width * 4 <= saved <= (checkpoints + 1) * batch * width * 4 + 1024
    assert saved <= saved_bytes(run(None), exclude=[weight, bias])


PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, dmup_kernels
    from benchmarks.measure import peak_resident_bytes, resident_bytes
    width, batch, depth, checkpoint = 64, 512, 1024, sys.argv[1]
    checkpoint = None if checkpoint == "none" else checkpoint
    torch.manual_seed(0)
    x = torch.randn(batch, width, requires_grad=True)
    weight = (torch.randn(depth, width, width) / width**0.5).requires_grad_()
    out = dmup_kernels.residual_stack(x, weight, scale=depth**-0.5, backend="cpp", checkpoint=checkpoint)
    loss = out.square().mean()
    before, peak_before = resident_bytes(), peak_resident_bytes()
    loss.backward()
    peak = peak_resident_bytes()
    print(max(peak - before, 0) if peak > peak_before else 0)
    """
)


@needs_cpp
@pytest.mark.parametrize("kind", ["stack", "mlp_stack"])
def test_checkpoint_spacing_up_to_the_largest_int(kind, seed):
    """k = 2**63 - 1 keeps x^0 only, as k = L does (the checkpoint count is computed without overflow): the
    same output and gradients, bitwise."""
    x = torch.randn(5, 8, requires_grad=True)
    if kind == "stack":
        params = [(torch.randn(4, 8, 8) / 8**0.5).requires_grad_()]
        run = lambda checkpoint: dmup_kernels.residual_stack(x, *params, scale=0.5, checkpoint=checkpoint)  # noqa: E731
    else:
        params = [(torch.randn(4, 6, 8) / 8**0.5).requires_grad_(), (torch.randn(4, 8, 6) / 6**0.5).requires_grad_()]
        run = lambda checkpoint: dmup_kernels.residual_mlp_stack(x, *params, scale=0.5, checkpoint=checkpoint)  # noqa: E731
    results = []
    for checkpoint in (4, 2**63 - 1):
        out = run(checkpoint)
        results.append([out.detach(), *torch.autograd.grad(out.square().sum(), [x, *params])])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_cpp
def test_backward_peak_memory_grows_by_gradients_and_one_segment():
    """At (n, B, L) = (64, 512, 1024) and k = 32: the backward's peak RSS over the RSS after the forward is
    at most the gradients (weight and x) plus one segment of recomputed states (k B n) plus 16 MiB of slack
    (allocator, thread stacks); saving every layer, at most the gradients and the slack: the backward stores
    no dh of the whole stack (docs/design.md §3.3), which alone would be L B n floats (128 MiB here)."""
    width, batch, depth, every = 64, 512, 1024, 32

    def growth(checkpoint: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", PEAK_MEMORY_SCRIPT, checkpoint],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,  # where dmup_kernels and benchmarks import from
        )
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    gradients = (depth * width * width + batch * width) * 4
    segment = every * batch * width * 4
    slack = 16 * 2**20
    checkpointed = growth("sqrt")
    assert checkpointed <= gradients + segment + slack, f"checkpointed backward grew by {checkpointed / 2**20:.1f} MiB"
    saving_every_layer = growth("none")
    assert saving_every_layer <= gradients + slack, f"backward grew by {saving_every_layer / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    "checkpoint,error",
    [(0, ValueError), (-2, ValueError), ("log", TypeError), (2.0, TypeError), (True, TypeError), ([4], TypeError)],
)
def test_bad_checkpoint_is_rejected(checkpoint, error):
    x, weight = torch.randn(3, 4), torch.randn(5, 4, 4)
    with pytest.raises(error, match='checkpoint must be None, an int >= 1 or "sqrt"'):
        dmup_kernels.residual_stack(x, weight, scale=0.5, checkpoint=checkpoint)
    with pytest.raises(error, match="checkpoint must be"):
        ResidualStack(4, 5, checkpoint=checkpoint)


def test_modules_keep_the_setting(seed):
    stack = ResidualStack(8, 6, bias=True, checkpoint=2)
    assert [stage.checkpoint for stage in stack.split(3)] == [2, 2, 2]
    linears = [block.linear for block in stack.to_reference_modules()]
    assert ResidualStack.from_linears(linears, checkpoint="sqrt").checkpoint == "sqrt"
    assert DepthMuPNet(3, 8, 6, 2, checkpoint=3).stack.checkpoint == 3
    assert "checkpoint=2" in repr(stack)
    assert "checkpoint" not in repr(ResidualStack(8, 6))


@needs_cpp
def test_module_with_checkpoints_trains_like_saving_every_layer(seed):
    torch.manual_seed(seed)
    net = DepthMuPNet(5, 16, 9, 3, bias=True, backend="cpp")
    checkpointed = DepthMuPNet(5, 16, 9, 3, bias=True, backend="cpp", checkpoint="sqrt")
    checkpointed.load_state_dict(net.state_dict())
    x = torch.randn(11, 5)
    for model in (net, checkpointed):
        model(x).square().mean().backward()
    for (name, a), b in zip(net.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name


@needs_cpp
def test_return_states_keeps_every_state(seed):
    """return_states needs x^0..x^L, so the forward keeps them whatever ``checkpoint`` says."""
    stack = ResidualStack(8, 5, backend="cpp", checkpoint=2)
    out, states = stack(torch.randn(4, 8), return_states=True)
    assert states.shape == (6, 4, 8) and torch.equal(states[-1], out.detach())


@needs_cpp
def test_op_schema_and_fake_rules_with_checkpoints(seed):
    x, weight, bias = torch.randn(19, 8), torch.randn(6, 8, 8) / 8**0.5, torch.randn(6, 8)
    args = (x, weight, bias, 0.4, "relu", "post", True, True, 4)
    torch.library.opcheck(torch.ops.dmup.residual_stack.default, args, test_utils=("test_schema", "test_faketensor"))
    _, saved, mask = torch.ops.dmup.residual_stack(*args)
    assert saved.shape == (2, 8, 19) and mask.shape[0] == 0
    backward_args = (torch.randn(19, 8), saved, mask, weight, bias, 0.4, "relu", "post", True, 4)
    torch.library.opcheck(
        torch.ops.dmup.residual_stack_backward.default, backward_args, test_utils=("test_schema", "test_faketensor")
    )
    with pytest.raises(ValueError, match=r"saved .* must have shape \(saved layers, width, batch\) = \[3, 8, 19\]"):
        torch.ops.dmup.residual_stack_backward(*backward_args[:-1], 2)  # 3 checkpoints, not the 2 given
    with pytest.raises(ValueError, match="checkpoint_every must be 0"):
        torch.ops.dmup.residual_stack(*args[:-1], -1)
