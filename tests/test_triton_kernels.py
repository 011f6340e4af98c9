"""The Triton kernels on CPU tensors through the Triton interpreter, against the float64 eager
reference (docs/design.md §5): kernel 1 (scaled_residual, one and two passes), kernels 2 and 3 (fused block and
depth-fused stack, forward and every gradient), their saved state, op registrations, modules,
launch configurations and the traffic model. NaN/Inf propagation and bad input are tested for every
backend in test_nonfinite.py and test_bad_input.py. float32 and float64 only: the interpreter has no bfloat16.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import dmup_kernels
from conftest import needs_triton, rel_err
from dmup_kernels import ResidualStack, ScaledResidual, reference
from parity import check_residual, check_stack, stack_kwargs
from sample_inputs import (
    ACTIVATIONS,
    BLOCKS,
    RESIDUAL_SPECS,
    TRITON_STACK_SPECS,
    ResidualSpec,
    StackSpec,
    make_residual_case,
    make_stack_case,
    random_tensor,
)

pytestmark = needs_triton

DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["f64", "f32"]

WIDE_RESIDUAL_SPECS = [
    ResidualSpec((3, 9000), "contiguous", "gelu", True, 0.5),  # two passes: the mean first
    ResidualSpec((2, 8193), "transposed", "abs", True, -0.75),
    ResidualSpec((2, 8192), "contiguous", "relu", True, 1.0),  # the widest single pass
]
RESIDUAL_TEST_SPECS = RESIDUAL_SPECS + WIDE_RESIDUAL_SPECS


# ---------------------------------------------------------------------------------------------------
# parity with the float64 reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec", RESIDUAL_TEST_SPECS, ids=[s.id for s in RESIDUAL_TEST_SPECS])
def test_scaled_residual_matches_reference(spec: ResidualSpec, dtype, seed):
    check_residual(make_residual_case(spec, dtype, seed, requires_grad=True), dtype, "triton")


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec", TRITON_STACK_SPECS, ids=[s.id for s in TRITON_STACK_SPECS])
def test_stack_matches_reference(spec: StackSpec, dtype, seed):
    check_stack(make_stack_case(spec, dtype, seed), dtype, "triton")


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("block", BLOCKS)
def test_return_states_match_reference_stream(block, seed):
    case = make_stack_case(StackSpec(48, 3, (2, 5), block, True, "abs", True, "contiguous"), torch.float64, seed)
    out, states = dmup_kernels.residual_stack(
        case.x, case.weight, case.bias, backend="triton", return_states=True, **stack_kwargs(case)
    )
    expected = torch.stack(reference.residual_stream(case.x, case.weight, case.bias, **stack_kwargs(case)))
    assert states.shape == (4, 2, 5, 48) and not states.requires_grad
    assert rel_err(states, expected) < 1e-13
    assert torch.equal(states[-1], out)


def test_modules_match_reference(seed):
    stack = ResidualStack(32, 3, activation="gelu", bias=True, backend="triton", dtype=torch.float64)
    with torch.no_grad():
        stack.bias.normal_()
    x = torch.randn(4, 32, dtype=torch.float64)
    expected = reference.residual_stack(x, stack.weight, stack.bias, scale=stack.scale, activation="gelu")
    assert rel_err(stack(x), expected) < 1e-13
    branch = torch.nn.Linear(32, 32, dtype=torch.float64)
    block = ScaledResidual(branch, 0.25, "silu", mean_subtract=True, backend="triton")
    assert rel_err(block(x), reference.scaled_residual(x, branch(x), 0.25, "silu", True)) < 1e-13


def test_auto_backend_stays_cpp_on_cpu():
    assert dmup_kernels.ops.resolve_backend("auto", torch.device("cpu")) in ("cpp", "reference")


# ---------------------------------------------------------------------------------------------------
# saved state
# ---------------------------------------------------------------------------------------------------


def _stack_op_inputs(activation: str, block: str, seed: int, rows: int = 13, width: int = 21, depth: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = random_tensor((rows, width), torch.float64, generator)
    weight = random_tensor((depth, width, width), torch.float64, generator) / math.sqrt(width)
    bias = 0.1 * random_tensor((depth, width), torch.float64, generator)
    return x, weight, bias


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("block", BLOCKS)
def test_saved_state_layout(activation, block, seed):
    """states = x_1..x_{L-1}; signs = bits packed little-endian per row (post block only): relu
    [not h <= 0], abs [h > 0] and [h < 0]; pre = h for gelu and silu in the post block."""
    x, weight, bias = _stack_op_inputs(activation, block, seed)
    out, states, signs, pre = torch.ops.dmup.triton_residual_stack(x, weight, bias, 0.5, activation, block, True, True)
    stream = reference.residual_stream(x, weight, bias, scale=0.5, activation=activation, block=block)
    assert rel_err(out, stream[-1]) < 1e-13
    assert states.shape == (2, 13, 21) and rel_err(states, torch.stack(stream[1:-1])) < 1e-13
    h = torch.stack([torch.nn.functional.linear(s, w, b) for s, w, b in zip(stream[:-1], weight, bias)])
    planes = {"relu": 1, "abs": 2}.get(activation, 0) if block == "post" else 0
    assert signs.dtype == torch.uint8 and signs.shape == (3, planes, 13, 3)
    sign_planes = ([~(h <= 0)] if activation == "relu" else [h > 0, h < 0])[:planes]
    for plane, bits in enumerate(sign_planes):
        expected = np.packbits(bits.numpy(), axis=-1, bitorder="little")
        assert np.array_equal(signs[:, plane].numpy(), expected), f"plane {plane}"
    if block == "post" and activation in ("gelu", "silu"):
        assert rel_err(pre, h) < 1e-13
    else:
        assert pre.shape[0] == 0


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_inference_saves_nothing(activation, seed):
    x, weight, bias = _stack_op_inputs(activation, "post", seed, depth=4)
    out, states, signs, pre = torch.ops.dmup.triton_residual_stack(x, weight, bias, 0.5, activation, "post", True, False)
    assert states.shape[0] == signs.shape[0] == pre.shape[0] == 0
    expected = reference.residual_stack(x, weight, bias, scale=0.5, activation=activation)
    assert rel_err(out, expected) < 1e-13
    with torch.no_grad():  # the module path: no saved state under no_grad, same output
        got = dmup_kernels.residual_stack(x, weight, bias, scale=0.5, activation=activation, backend="triton")
    assert torch.equal(got, out)


# ---------------------------------------------------------------------------------------------------
# op registration
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("activation", "block"), [("relu", "post"), ("abs", "post"), ("silu", "post"), ("gelu", "pre")])
@pytest.mark.parametrize("save", [True, False])
def test_opcheck_stack(activation, block, save, seed):
    x, weight, bias = _stack_op_inputs(activation, block, seed, rows=5, width=7, depth=2)
    torch.library.opcheck(
        torch.ops.dmup.triton_residual_stack.default, (x, weight, bias, 0.5, activation, block, True, save)
    )


def test_opcheck_stack_backward_and_scaled_residual(seed):
    x, weight, bias = _stack_op_inputs("abs", "post", seed, rows=5, width=7, depth=2)
    _, states, signs, pre = torch.ops.dmup.triton_residual_stack(x, weight, bias, 0.5, "abs", "post", True, True)
    args = (torch.randn_like(x), x, states, signs, pre, weight, bias, 0.5, "abs", "post", True)
    torch.library.opcheck(torch.ops.dmup.triton_residual_stack_backward.default, args)
    torch.library.opcheck(torch.ops.dmup.triton_scaled_residual.default, (x, torch.randn_like(x), 0.5, "gelu", True))


def test_gradcheck(seed):
    generator = torch.Generator().manual_seed(seed)
    x = random_tensor((3, 6), torch.float64, generator).requires_grad_()
    weight = (random_tensor((2, 6, 6), torch.float64, generator) / 3).requires_grad_()
    bias = (0.1 * random_tensor((2, 6), torch.float64, generator)).requires_grad_()

    def stack(x, weight, bias):
        return dmup_kernels.residual_stack(x, weight, bias, scale=0.7, activation="silu", backend="triton")

    assert torch.autograd.gradcheck(stack, (x, weight, bias), fast_mode=True)


def test_backward_after_inference_forward_raises(seed):
    x, weight, bias = _stack_op_inputs("relu", "post", seed)
    weight.requires_grad_()
    out, *_ = torch.ops.dmup.triton_residual_stack(x, weight, bias, 0.5, "relu", "post", True, False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------------
# launch configuration and device rules
# ---------------------------------------------------------------------------------------------------


def test_interpreter_runs_pinned_configs():
    from dmup_kernels.triton import residual_stack as stack_kernels
    from dmup_kernels.triton import tuning

    assert not tuning.AUTOTUNE
    assert stack_kernels.stack_forward_kernel.__class__.__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_launch_configs_fit_registers_and_shared_memory(dtype):
    """Pinned configs keep a row tile within the per-thread register budget (16 warps at most) and the
    stack kernels' operand buffers within the shared-memory budget, or the stack leaves the fused kernels;
    autotuning candidates fit twice the register budget and the shared budget (else the pinned config
    alone); tl.dot needs at least 16 rows and K-chunks no wider than the tile."""
    from dmup_kernels.triton import residual_stack as stack_kernels
    from dmup_kernels.triton import scaled_residual as residual_kernels
    from dmup_kernels.triton.tuning import REGISTER_BYTES_PER_THREAD, SHARED_MEMORY_BUDGET, fits_registers

    itemsize = dtype.itemsize
    for block_n in (16, 64, 128, 256, 512, 1024, 8192):
        args = {"x_ptr": torch.empty(0, dtype=dtype), "BLOCK_N": block_n}
        config = residual_kernels._pinned_config(block_n, itemsize)
        tile = config.kwargs["BLOCK_M"] * block_n
        assert tile * itemsize <= REGISTER_BYTES_PER_THREAD * 32 * config.num_warps or config.num_warps == 16
        kept = residual_kernels._prune(residual_kernels._configs(), args)
        assert kept and all(fits_registers(c, c.kwargs["BLOCK_M"] * block_n, itemsize) for c in kept)
        if block_n > 1024:
            continue  # the stack kernels take n <= 1024
        config = stack_kernels._pinned_stack_config(block_n, itemsize)
        assert (config is not None) == stack_kernels.uses_fused_kernels(block_n, itemsize)
        if config is None:
            assert block_n > stack_kernels.DEPTH_FUSED_MAX_WIDTH  # the depth-fused widths always fit
            continue
        assert config.kwargs["BLOCK_M"] >= 16 and config.kwargs["BLOCK_K"] <= block_n
        assert stack_kernels._stack_shared_bytes(config, block_n, itemsize) <= SHARED_MEMORY_BUDGET
        kept = stack_kernels._prune_stack(stack_kernels._stack_configs(), args)
        assert kept and (all(stack_kernels._fits(c, block_n, itemsize) for c in kept) or kept == [config])


def test_triton_backend_on_cpu_without_interpreter_names_the_device():
    code = (
        "import torch, dmup_kernels\n"
        "try:\n"
        "    dmup_kernels.residual_stack(torch.ones(2, 4), torch.ones(1, 4, 4), scale=1.0, backend='triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = {key: value for key, value in __import__("os").environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "backend='triton' runs on CUDA tensors" in result.stdout and "cpu" in result.stdout, result.stderr


@pytest.mark.parametrize("activation", ["relu", "abs", "silu", "identity"])
def test_traffic_model_counts_the_state_the_stack_saves(activation, seed):
    """benchmarks.traffic's depth-fused stack writes x_l and the phi' state once per layer: the bytes the
    op really keeps for backward, per layer."""
    from benchmarks.traffic import LayerShape

    depth = 4
    x, weight, bias = _stack_op_inputs(activation, "post", seed, rows=9, width=21, depth=depth)
    x, weight = x.float(), weight.float()
    _, states, signs, pre = torch.ops.dmup.triton_residual_stack(x, weight, None, 0.5, activation, "post", True, True)
    kept = x.nbytes + states.nbytes + signs.nbytes + pre.nbytes  # x_0 is the op's input, kept by autograd
    shape = LayerShape(21, 9, activation)
    assert kept == depth * (shape.act + shape.signs + shape.pre_activation)
