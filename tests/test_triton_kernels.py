"""What is particular to the Triton kernels, on CPU tensors through the Triton interpreter or on CUDA tensors
(TRITON_INTERPRET=0 on a GPU, make gpu-check): the wide routes of the stack, returned states, modules, their
saved state, op registrations, launch configurations, routing and the traffic model; and the depth-fused MLP
stack: its parity on odd widths and hidden widths, routing, saved state, checkpoints and op registration. Their
parity with the float64 reference on the op's shapes is tested with every backend in test_scaled_residual.py,
test_residual_stack.py and test_residual_mlp_stack.py. NaN/Inf propagation and bad input are tested for every
backend in test_nonfinite.py and test_bad_input.py. float32 and float64, and float16 for the kernels
themselves (the interpreter has no bfloat16; tests/test_triton_compile.py compiles it).
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import dmup_kernels
from dmup_kernels import ResidualStack, ScaledResidual, reference
from dmup_kernels._layout import MlpStackSettings, MlpWeights
from dmup_kernels.ops.residual_mlp_stack import MLP_STACK_BACKENDS

from conftest import INTERPRETED, needs_triton, rel_err
from parity import (
    MLP_RESULTS,
    check_mlp_stack,
    check_stack,
    check_within_twice_eager,
    mlp_outputs_and_grads,
    mlp_stack_kwargs,
    stack_kwargs,
)
from sample_inputs import (
    ACTIVATIONS,
    BLOCKS,
    TRITON_MLP_STACK_SPECS,
    TRITON_WIDE_STACK_SPECS,
    MlpStackSpec,
    StackSpec,
    make_mlp_stack_case,
    make_stack_case,
    random_tensor,
)

pytestmark = needs_triton

DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["f64", "f32"]


# ---------------------------------------------------------------------------------------------------
# the wide routes, returned states, modules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec", TRITON_WIDE_STACK_SPECS, ids=[s.id for s in TRITON_WIDE_STACK_SPECS])
def test_wide_stack_routes_match_reference(spec: StackSpec, dtype, monkeypatch, triton_device, seed):
    """Wider than the depth-fused stack (docs/design.md §7.8): up to n = 1024 the fused kernel once per layer,
    beyond a library GEMM per layer and the epilogue kernel; without an SM count, so the route is the width's."""
    from dmup_kernels.triton import ops as triton_ops  # the Triton backend routes by the SM count

    calls = []
    monkeypatch.setattr(triton_ops, "sm_count", lambda device: None)
    for op in ("triton_residual_stack", "triton_scaled_residual"):
        monkeypatch.setattr(torch.ops.dmup, op, _counting(getattr(torch.ops.dmup, op), op, calls))
    check_stack(make_stack_case(spec, dtype, seed).to(triton_device), dtype, "triton")
    assert set(calls) == ({"triton_residual_stack"} if spec.width <= 1024 else {"triton_scaled_residual"})


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("block", BLOCKS)
def test_return_states_match_reference_stream(block, triton_device, seed):
    spec = StackSpec(48, 3, (2, 5), block, True, "abs", True, "contiguous")
    case = make_stack_case(spec, torch.float64, seed).to(triton_device)
    out, states = dmup_kernels.residual_stack(
        case.x, case.weight, case.bias, backend="triton", return_states=True, **stack_kwargs(case)
    )
    expected = torch.stack(reference.residual_stream(case.x, case.weight, case.bias, **stack_kwargs(case)))
    assert states.shape == (4, 2, 5, 48) and not states.requires_grad
    assert rel_err(states, expected) < 1e-13
    assert torch.equal(states[-1], out)


def test_modules_match_reference(triton_device, seed):
    stack = ResidualStack(
        32, 3, activation="gelu", bias=True, backend="triton", dtype=torch.float64, device=triton_device
    )
    with torch.no_grad():
        stack.bias.normal_()
    x = torch.randn(4, 32, dtype=torch.float64, device=triton_device)
    expected = reference.residual_stack(x, stack.weight, stack.bias, scale=stack.scale, activation="gelu")
    assert rel_err(stack(x), expected) < 1e-13
    branch = torch.nn.Linear(32, 32, dtype=torch.float64, device=triton_device)
    block = ScaledResidual(branch, 0.25, "silu", mean_subtract=True, backend="triton")
    assert rel_err(block(x), reference.scaled_residual(x, branch(x), 0.25, "silu", True)) < 1e-13


def test_auto_backend_stays_cpp_on_cpu():
    assert dmup_kernels.ops.resolve_backend("auto", torch.device("cpu")) in ("cpp", "reference")


@pytest.mark.parametrize(
    ("has_triton", "has_cuda_kernels", "capability", "fuses", "expected"),
    [
        (True, True, (9, 0), True, "triton"),  # Triton's depth-fused kernels take the call
        (True, True, (9, 0), False, "cuda"),  # per-layer work: the CUDA C++ host loop
        (True, True, (9, 0), None, "cuda"),  # an op without depth-fused Triton kernels (scaled_residual)
        (True, False, (9, 0), False, "triton"),  # no CUDA kernels built: Triton's per-layer route
        (False, True, (9, 0), True, "cuda"),
        (False, False, (9, 0), True, "reference"),
        (True, True, (6, 1), True, "cuda"),  # a GPU older than Triton compiles for
        (True, False, (6, 1), True, "reference"),
    ],
)
def test_auto_backend_on_cuda_tensors(has_triton, has_cuda_kernels, capability, fuses, expected, monkeypatch):
    """The rule behind "auto" on CUDA tensors (no GPU needed: the device's capability is stubbed)."""
    from dmup_kernels.ops import _backend

    monkeypatch.setattr(_backend, "HAS_TRITON", has_triton)
    monkeypatch.setattr(_backend, "HAS_CUDA_KERNELS", has_cuda_kernels)
    monkeypatch.setattr(_backend, "_capability", lambda device: capability)
    triton_fuses = None if fuses is None else (lambda: fuses)
    assert _backend.resolve_backend("auto", torch.device("cuda"), triton_fuses=triton_fuses) == expected


def test_triton_backend_refuses_a_gpu_older_than_triton_supports(monkeypatch):
    from dmup_kernels.ops import _backend

    monkeypatch.setattr(_backend, "HAS_TRITON", True)
    monkeypatch.setattr(_backend, "_capability", lambda device: (6, 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla P100")
    with pytest.raises(ValueError, match=r"compute capability 7.0 or newer.*Tesla P100 has 6.1"):
        _backend.resolve_backend("triton", torch.device("cuda"))


@pytest.mark.parametrize(("rows", "width", "fused"), [(4096, 64, True), (8, 1025, False), (4096, 512, False)])
def test_auto_backend_asks_the_triton_route(rows, width, fused, monkeypatch, triton_device):
    """residual_stack and residual_mlp_stack ask their Triton backend whether its depth-fused kernels take
    the rows (the rule its forward follows) before "auto" settles on Triton or CUDA C++; n = 512 runs the
    stack's fused block a layer at a time, which does not count."""
    from dmup_kernels.ops import _backend
    from dmup_kernels.triton import ops as triton_ops

    monkeypatch.setattr(triton_ops, "sm_count", lambda device: 132)
    asked = []
    resolve = _backend.resolve_backend

    def recording(backend, device, *, triton_fuses=None):
        asked.append(triton_fuses())
        return resolve(backend, device, triton_fuses=triton_fuses)

    for module in ("residual_stack", "residual_mlp_stack"):
        monkeypatch.setattr(importlib.import_module(f"dmup_kernels.ops.{module}"), "resolve_backend", recording)
    x = torch.randn(rows, width, device=triton_device)
    weight = torch.randn(1, width, width, device=triton_device) / width**0.5
    dmup_kernels.residual_stack(x, weight, scale=0.5)
    dmup_kernels.residual_mlp_stack(x, weight, weight, scale=0.5)
    assert asked == [fused, fused]


# ---------------------------------------------------------------------------------------------------
# saved state
# ---------------------------------------------------------------------------------------------------


def _stack_op_inputs(
    activation: str, block: str, seed: int, device: str, rows: int = 13, width: int = 21, depth: int = 3
):
    generator = torch.Generator().manual_seed(seed)
    x = random_tensor((rows, width), torch.float64, generator)
    weight = random_tensor((depth, width, width), torch.float64, generator) / math.sqrt(width)
    bias = 0.1 * random_tensor((depth, width), torch.float64, generator)
    return x.to(device), weight.to(device), bias.to(device)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("block", BLOCKS)
def test_saved_state_layout(activation, block, triton_device, seed):
    """states = x_1..x_{L-1}; signs = bits packed little-endian per row (post block only): relu
    [not h <= 0], abs [h > 0] and [h < 0]; pre = h for gelu and silu in the post block."""
    x, weight, bias = _stack_op_inputs(activation, block, seed, triton_device)
    out, states, signs, pre = torch.ops.dmup.triton_residual_stack(x, weight, bias, 0.5, activation, block, True, True)
    stream = reference.residual_stream(x, weight, bias, scale=0.5, activation=activation, block=block)
    assert rel_err(out, stream[-1]) < 1e-13
    assert states.shape == (2, 13, 21) and rel_err(states, torch.stack(stream[1:-1])) < 1e-13
    h = torch.stack([torch.nn.functional.linear(s, w, b) for s, w, b in zip(stream[:-1], weight, bias)])
    planes = {"relu": 1, "abs": 2}.get(activation, 0) if block == "post" else 0
    assert signs.dtype == torch.uint8 and signs.shape == (3, planes, 13, 3)
    sign_planes = ([~(h <= 0)] if activation == "relu" else [h > 0, h < 0])[:planes]
    for plane, bits in enumerate(sign_planes):
        expected = np.packbits(bits.cpu().numpy(), axis=-1, bitorder="little")
        assert np.array_equal(signs[:, plane].cpu().numpy(), expected), f"plane {plane}"
    if block == "post" and activation in ("gelu", "silu"):
        assert rel_err(pre, h) < 1e-13
    else:
        assert pre.shape[0] == 0


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_inference_saves_nothing(activation, triton_device, seed):
    x, weight, bias = _stack_op_inputs(activation, "post", seed, triton_device, depth=4)
    out, states, signs, pre = torch.ops.dmup.triton_residual_stack(
        x, weight, bias, 0.5, activation, "post", True, False
    )
    assert states.shape[0] == signs.shape[0] == pre.shape[0] == 0
    expected = reference.residual_stack(x, weight, bias, scale=0.5, activation=activation)
    assert rel_err(out, expected) < 1e-13
    with torch.no_grad():  # the module path: no saved state under no_grad, same output
        got = dmup_kernels.residual_stack(x, weight, bias, scale=0.5, activation=activation, backend="triton")
    assert torch.equal(got, out)


# ---------------------------------------------------------------------------------------------------
# op registration
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "block"), [("relu", "post"), ("abs", "post"), ("silu", "post"), ("gelu", "pre")]
)
@pytest.mark.parametrize("save", [True, False])
def test_opcheck_stack(activation, block, save, triton_device, seed):
    x, weight, bias = _stack_op_inputs(activation, block, seed, triton_device, rows=5, width=7, depth=2)
    torch.library.opcheck(
        torch.ops.dmup.triton_residual_stack.default, (x, weight, bias, 0.5, activation, block, True, save)
    )


def test_opcheck_stack_backward_and_scaled_residual(triton_device, seed):
    x, weight, bias = _stack_op_inputs("abs", "post", seed, triton_device, rows=5, width=7, depth=2)
    _, states, signs, pre = torch.ops.dmup.triton_residual_stack(x, weight, bias, 0.5, "abs", "post", True, True)
    args = (torch.randn_like(x), x, states, signs, pre, weight, bias, 0.5, "abs", "post", True)
    torch.library.opcheck(torch.ops.dmup.triton_residual_stack_backward.default, args)
    torch.library.opcheck(torch.ops.dmup.triton_scaled_residual.default, (x, torch.randn_like(x), 0.5, "gelu", True))


def test_gradcheck(triton_device, seed):
    generator = torch.Generator().manual_seed(seed)
    x = random_tensor((3, 6), torch.float64, generator).to(triton_device).requires_grad_()
    weight = (random_tensor((2, 6, 6), torch.float64, generator) / 3).to(triton_device).requires_grad_()
    bias = (0.1 * random_tensor((2, 6), torch.float64, generator)).to(triton_device).requires_grad_()

    def stack(x, weight, bias):
        return dmup_kernels.residual_stack(x, weight, bias, scale=0.7, activation="silu", backend="triton")

    assert torch.autograd.gradcheck(stack, (x, weight, bias), fast_mode=True)


def test_backward_after_inference_forward_raises(triton_device, seed):
    x, weight, bias = _stack_op_inputs("relu", "post", seed, triton_device)
    weight.requires_grad_()
    out, *_ = torch.ops.dmup.triton_residual_stack(x, weight, bias, 0.5, "relu", "post", True, False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------------
# launch configuration and device rules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the kernels are compiled and autotuned")
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
def test_traffic_model_counts_the_state_the_stack_saves(activation, triton_device, seed):
    """benchmarks.traffic's depth-fused stack writes x_l and the phi' state once per layer: the bytes the
    op really keeps for backward, per layer."""
    from benchmarks.traffic import LayerShape

    depth = 4
    x, weight, bias = _stack_op_inputs(activation, "post", seed, triton_device, rows=9, width=21, depth=depth)
    x, weight = x.float(), weight.float()
    _, states, signs, pre = torch.ops.dmup.triton_residual_stack(x, weight, None, 0.5, activation, "post", True, True)
    kept = x.nbytes + states.nbytes + signs.nbytes + pre.nbytes  # x_0 is the op's input, kept by autograd
    shape = LayerShape(21, 9, activation)
    assert kept == depth * (shape.act + shape.signs + shape.pre_activation)


# ---------------------------------------------------------------------------------------------------
# half precision: float32 arithmetic inside the kernels, results in the tensors' dtype
# ---------------------------------------------------------------------------------------------------

HALF_DTYPES = [torch.float16] if INTERPRETED else [torch.float16, torch.bfloat16]
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
"""A few roundings of the output to the dtype (float32 arithmetic inside adds nothing visible)."""


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # gelu's tanh at 20: exp(2z) = inf, tanh = 1
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width", [48, 9000], ids=["one-pass", "two-pass"])
def test_half_precision_epilogue(width, activation, dtype, triton_device, seed):
    """Rows of 9000 values near 20: their sum (about 180000) overflows float16, the float32 total does not."""
    from dmup_kernels.triton.scaled_residual import scaled_residual_backward, scaled_residual_forward

    x = (20 + 3 * torch.randn(3, width)).to(triton_device, dtype)
    branch = (20 + 3 * torch.randn(3, width)).to(triton_device, dtype)
    out = scaled_residual_forward(x, branch, 0.37, activation, True)
    grad = scaled_residual_backward(x, branch, 0.37, activation, True)
    x64, branch64 = x.double().requires_grad_(), branch.double().requires_grad_()
    expected = reference.scaled_residual(x64, branch64, 0.37, activation, True)
    (expected_grad,) = torch.autograd.grad(expected, branch64, x64.detach())
    assert out.dtype == grad.dtype == dtype
    assert rel_err(out, expected) < HALF_TOLERANCE[dtype]
    assert rel_err(grad, expected_grad) < HALF_TOLERANCE[dtype]


def check_half_precision_kernels(names, got, reference_forward, inputs, grad_out) -> None:
    """The 2x-eager rule for the kernels' half-precision results ``got`` (output, then the gradients of
    ``inputs``): ``reference_forward(*leaves)`` and its gradients, run in float64 and in the inputs' dtype."""
    dtype = inputs[0].dtype
    results = {}
    for precision in (torch.float64, dtype):
        leaves = [t.detach().to(precision).requires_grad_() for t in inputs]
        output = reference_forward(*leaves)
        results[precision] = [output, *torch.autograd.grad(output, leaves, grad_out.to(precision))]
    check_within_twice_eager(names, got, results[dtype], results[torch.float64], dtype)


def _half_precision_stack_run(activation: str, block: str, dtype, device, seed):
    """The stack kernels on half tensors (rows=19, width=32): the inputs (x, weight, bias), grad_out, and
    what stack_forward and stack_backward return."""
    from dmup_kernels.triton.residual_stack import stack_backward, stack_forward

    inputs = [t.to(dtype) for t in _stack_op_inputs(activation, block, seed, device, rows=19, width=32)]
    grad_out = torch.randn_like(inputs[0])
    out, states, signs, pre = stack_forward(*inputs, 0.5, activation, block, True, True)
    grads = stack_backward(grad_out, inputs[0], states, signs, pre, *inputs[1:], 0.5, activation, block, True)
    return inputs, grad_out, (out, states), grads


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("activation", "block"), [("relu", "post"), ("abs", "post"), ("gelu", "post"), ("silu", "pre")]
)
def test_half_precision_stack_kernels(activation, block, dtype, triton_device, seed):
    """The stack kernels on half tensors: output and gradients against the float64 reference from the
    same (rounded) inputs, within 2x the error of eager PyTorch in the dtype plus 1e-3 (a sign bit that
    rounding flips moves a whole gradient row, in eager as in the kernels)."""
    inputs, grad_out, (out, _), grads = _half_precision_stack_run(activation, block, dtype, triton_device, seed)
    names = ("output", "grad x", "grad weight", "grad bias")
    check_half_precision_kernels(
        names,
        [out, *grads],
        lambda *leaves: reference.residual_stack(*leaves, scale=0.5, activation=activation, block=block),
        inputs,
        grad_out,
    )


def _half_precision_stack_model(x, weight, bias, grad_out, scale: float, activation: str) -> dict[str, torch.Tensor]:
    """What the stack kernels compute for relu or abs post blocks with MS on half tensors (docs/design.md
    §7.7), in PyTorch: a float32 stream; each GEMM takes its operands in the half dtype (x_l as stored, dh_l
    as stored) and sums in float32; the sign bits of the float32 h; results stored in the half dtype."""
    half = x.dtype
    stream, hs = [x.float()], []
    for w, b in zip(weight, bias):
        hs.append(stream[-1].to(half).float() @ w.float().T + b.float())
        stream.append(stream[-1] + scale * reference.subtract_mean(reference.activation(hs[-1], activation)))
    g, dhs = grad_out.float(), []
    for w, h in zip(weight.flip(0), reversed(hs)):
        dv = reference.subtract_mean(scale * g)
        dhs.insert(0, (dv * torch.sign(h) if activation == "abs" else torch.where(h > 0, dv, 0.0)).to(half))
        g = g + dhs[0].float() @ w.float()
    grad_weight = torch.stack([dh.float().T @ state.to(half).float() for dh, state in zip(dhs, stream)])
    return {
        "output": stream[-1].to(half),
        "states": torch.stack(stream[1:-1]).to(half),
        "grad x": g.to(half),
        "grad weight": grad_weight.to(half),
    }


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "abs"])
def test_half_precision_stack_kernels_round_as_designed(activation, dtype, triton_device, seed):
    """The stack kernels on half tensors against a model of their roundings: within one unit of the
    dtype's precision, each result on its own (the interpreter matches the model to the bit)."""
    inputs, grad_out, (out, states), (grad_x, grad_weight, _) = _half_precision_stack_run(
        activation, "post", dtype, triton_device, seed
    )
    got = {"output": out, "states": states, "grad x": grad_x, "grad weight": grad_weight}
    model = _half_precision_stack_model(*inputs, grad_out, 0.5, activation)
    errors = {name: rel_err(got[name], model[name]) for name in model}
    assert max(errors.values()) <= torch.finfo(dtype).eps, errors


# ---------------------------------------------------------------------------------------------------
# routing: fused kernels or a GEMM per layer, by the program count against the SM count
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "width", "itemsize", "sms", "fused"),
    [
        (64, 1024, 4, None, True),  # no SM count: CPU tensors under the interpreter
        (64, 256, 4, 132, True),  # a layer's weights (256 KiB) are small: fused with 4 programs
        (64, 256, 8, 132, False),  # float64, 512 KiB per layer: 4 programs on 132 SMs
        (64 * 16, 256, 8, 132, False),  # 64 programs of 16 rows: under half of 132 SMs
        (66 * 16, 256, 8, 132, True),  # 66 programs: half of them
        (64 * 16, 256, 8, 108, True),  # 64 programs on an A100's 108 SMs
        (1024, 1024, 4, 132, False),  # 64 programs of 16 rows
        (1024, 1024, 4, 108, True),  # the same on 108 SMs
        (8192, 512, 4, 132, True),
    ],
)
def test_fused_kernels_need_programs_for_half_the_sms(rows, width, itemsize, sms, fused):
    from dmup_kernels.triton.residual_stack import fills_the_gpu

    assert fills_the_gpu(rows, width, itemsize, sms) is fused


@pytest.mark.parametrize("sms", [None, 132])
def test_routing_follows_the_sm_count(sms, monkeypatch, triton_device, seed):
    """With a GPU's SM count (faked here) a few float64 rows take a GEMM per layer + the epilogue kernel;
    both routes give the reference's result."""
    from dmup_kernels.triton import ops as triton_ops  # the Triton backend routes by the SM count

    calls = []
    monkeypatch.setattr(triton_ops, "sm_count", lambda device: sms)
    for op in ("triton_residual_stack", "triton_scaled_residual"):
        monkeypatch.setattr(torch.ops.dmup, op, _counting(getattr(torch.ops.dmup, op), op, calls))
    x, weight, bias = _stack_op_inputs("gelu", "post", seed, triton_device, rows=40, width=200, depth=3)
    out = dmup_kernels.residual_stack(x, weight, bias, scale=0.5, activation="gelu", backend="triton")
    assert rel_err(out, reference.residual_stack(x, weight, bias, scale=0.5, activation="gelu")) < 1e-13
    assert set(calls) == ({"triton_residual_stack"} if sms is None else {"triton_scaled_residual"})


def _counting(op, name: str, calls: list[str]):
    def run(*args, **kwargs):
        calls.append(name)
        return op(*args, **kwargs)

    return run


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device(seed):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (the launch's device guard)."""
    x, weight, bias = _stack_op_inputs("relu", "post", seed, "cuda:1")
    with torch.cuda.device(0):
        out = dmup_kernels.residual_stack(x, weight, bias, scale=0.5, backend="triton")
        torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda:1")
    assert rel_err(out, reference.residual_stack(x, weight, bias, scale=0.5)) < 1e-13


# ---------------------------------------------------------------------------------------------------
# the depth-fused MLP stack: parity, routing, saved state, checkpoints, op registration
# ---------------------------------------------------------------------------------------------------


def _counting_mlp_ops(monkeypatch, calls: list[str]) -> None:
    for op in ("triton_residual_mlp_stack", "triton_scaled_residual"):
        monkeypatch.setattr(torch.ops.dmup, op, _counting(getattr(torch.ops.dmup, op), op, calls))


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec", TRITON_MLP_STACK_SPECS, ids=[s.id for s in TRITON_MLP_STACK_SPECS])
def test_depth_fused_mlp_stack_matches_reference(spec: MlpStackSpec, dtype, monkeypatch, triton_device, seed):
    """The depth-fused MLP kernels (one forward launch, one backward launch and the batched weight GEMMs)
    against the float64 reference; every spec is narrow enough for them, whatever the GPU."""
    from dmup_kernels.triton.residual_mlp_stack import depth_fused_mlp_compiles

    if not depth_fused_mlp_compiles(dtype.itemsize, spec.activation):
        pytest.skip("this Triton cannot compile the depth-fused MLP kernels here (FLOAT64_SIGN_BIT_DOTS)")
    calls = []
    _counting_mlp_ops(monkeypatch, calls)
    check_mlp_stack(make_mlp_stack_case(spec, dtype, seed).to(triton_device), dtype, "triton")
    assert calls == ["triton_residual_mlp_stack"]


@pytest.mark.parametrize(("width", "sms", "fused"), [(7, None, True), (128, None, True), (129, None, False)])
def test_mlp_stack_routes_by_width(width, sms, fused, monkeypatch, triton_device, seed):
    """Up to DEPTH_FUSED_MLP_MAX_WIDTH the depth-fused op and its state; wider, a layer at a time (library
    GEMMs and the epilogue kernel, a recorded stream); both give the reference's result and gradients."""
    from dmup_kernels.triton import ops as triton_ops
    from dmup_kernels.triton.residual_mlp_stack import depth_fused_mlp_compiles

    fused = fused and depth_fused_mlp_compiles(torch.float64.itemsize, "abs")
    calls = []
    monkeypatch.setattr(triton_ops, "sm_count", lambda device: sms)
    _counting_mlp_ops(monkeypatch, calls)
    case = make_mlp_stack_case(MlpStackSpec(width, 9, 2, (5,), True, "abs", True), torch.float64, seed)
    case = case.to(triton_device)
    stack = MLP_STACK_BACKENDS["triton"]
    _, state = stack.forward(case.x, MlpWeights(*case.params), MlpStackSettings(**mlp_stack_kwargs(case)), True)
    assert isinstance(state, triton_ops.FusedMlpState) is fused
    calls.clear()
    check_mlp_stack(case, torch.float64, "triton")
    assert set(calls) == ({"triton_residual_mlp_stack"} if fused else {"triton_scaled_residual"})


@pytest.mark.parametrize(
    ("rows", "width", "hidden", "itemsize", "sms", "fused"),
    [
        (64, 128, 512, 4, None, True),  # no SM count: CPU tensors under the interpreter
        (64, 129, 4, 4, None, False),  # wider than the register tiles
        (64, 64, 256, 4, 132, True),  # a block's weights (128 KiB) are small: fused with 2 programs
        (64, 128, 512, 4, 132, False),  # 512 KiB per block: 2 programs on 132 SMs
        (64 * 16, 128, 512, 4, 132, False),  # 64 programs of 16 rows: under half of 132 SMs
        (66 * 16, 128, 512, 4, 132, True),  # 66 programs: half of them
    ],
)
def test_depth_fused_mlp_needs_programs_for_half_the_sms(rows, width, hidden, itemsize, sms, fused):
    from dmup_kernels.triton.residual_mlp_stack import uses_depth_fused_mlp

    assert uses_depth_fused_mlp(rows, width, hidden, itemsize, "relu", sms) is fused


@pytest.mark.parametrize("width", [16, 128])
def test_depth_fused_mlp_keeps_float64_sign_bits_off_older_triton(width, monkeypatch):
    """Where Triton cannot compile the float64 backward of relu and abs (at any width), those MLP stacks run
    per layer; float32, and float64 with gelu, silu or identity, stay depth-fused."""
    from dmup_kernels.triton import residual_mlp_stack

    def fused(itemsize: int, activation: str) -> bool:
        rows, sms = 66 * 16, 132  # rows whose programs fill half of 132 SMs
        return residual_mlp_stack.uses_depth_fused_mlp(rows, width, 64, itemsize, activation, sms)

    monkeypatch.setattr(residual_mlp_stack, "FLOAT64_SIGN_BIT_DOTS", False)
    assert not fused(8, "relu") and not fused(8, "abs")
    assert all(fused(8, activation) for activation in ("gelu", "silu", "identity"))
    assert all(fused(4, activation) for activation in ACTIVATIONS)
    monkeypatch.setattr(residual_mlp_stack, "FLOAT64_SIGN_BIT_DOTS", True)
    assert all(fused(8, activation) for activation in ACTIVATIONS)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_saved_state_layout(activation, triton_device, seed):
    """states = x_1..x_{L-1}; signs = the bits of h1 = x_l W1^T + b1 packed little-endian per row, hidden
    units in place of features (relu [not h1 <= 0], abs [h1 > 0] and [h1 < 0]); no (B, m) tensor: a hidden
    width of 45 takes two chunks, the second partial, and six sign bytes, the last partial."""

    rows, width, hidden, depth = 13, 21, 45, 3
    case = make_mlp_stack_case(MlpStackSpec(width, hidden, depth, (rows,), True, activation, True), torch.float64, seed)
    case = case.to(triton_device)
    # The op itself: its float64 forward compiles on every Triton, the backend's route may not take it.
    out, states, signs = torch.ops.dmup.triton_residual_mlp_stack(
        case.x, *case.params, case.scale, activation, True, True
    )
    stream = reference.residual_mlp_stream(case.x, *case.params, **mlp_stack_kwargs(case))
    assert rel_err(out, stream[-1]) < 1e-13
    assert states.shape == (depth - 1, rows, width) and rel_err(states, torch.stack(stream[1:-1])) < 1e-13
    planes = {"relu": 1, "abs": 2}.get(activation, 0)
    assert signs.dtype == torch.uint8 and signs.shape == (depth, planes, rows, 6)
    h1 = torch.stack([torch.nn.functional.linear(x, w, b) for x, w, b in zip(stream[:-1], case.weight1, case.bias1)])
    for plane, bits in enumerate(([~(h1 <= 0)] if activation == "relu" else [h1 > 0, h1 < 0])[:planes]):
        expected = np.packbits(bits.cpu().numpy(), axis=-1, bitorder="little")
        assert np.array_equal(signs[:, plane].cpu().numpy(), expected), f"plane {plane}"
    assert all(hidden not in tensor.shape for tensor in (out, states, signs))


def test_mlp_inference_saves_nothing_and_backward_raises(triton_device, seed):
    from dmup_kernels.triton.residual_mlp_stack import depth_fused_mlp_compiles

    case = make_mlp_stack_case(MlpStackSpec(9, 20, 4, (11,), True, "relu", True), torch.float64, seed)
    case = case.to(triton_device)
    args = (case.x, *case.params, case.scale, "relu", True)
    out, states, signs = torch.ops.dmup.triton_residual_mlp_stack(*args, False)
    assert states.shape[0] == signs.shape[0] == 0
    expected = reference.residual_mlp_stack(case.x, *case.params, **mlp_stack_kwargs(case))
    assert rel_err(out, expected) < 1e-13
    with torch.no_grad():
        got = dmup_kernels.residual_mlp_stack(case.x, *case.params, **mlp_stack_kwargs(case), backend="triton")
    if depth_fused_mlp_compiles(torch.float64.itemsize, "relu"):  # else the function runs a layer at a time
        assert torch.equal(got, out)
    assert rel_err(got, expected) < 1e-13
    case.weight1.requires_grad_()
    out, *_ = torch.ops.dmup.triton_residual_mlp_stack(*args, False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


@pytest.mark.parametrize("activation", ["relu", "abs", "gelu"])
def test_mlp_checkpoints_match_saving_every_layer(activation, triton_device, seed):
    """Fused segments under torch.utils.checkpoint: within 1e-12 of saving every layer in float64."""
    case = make_mlp_stack_case(MlpStackSpec(12, 24, 6, (9,), True, activation, True), torch.float64, seed)
    case = case.to(triton_device)
    grad_out = torch.randn(case.x.shape, dtype=torch.float64).to(triton_device)
    save_all = mlp_outputs_and_grads(case, grad_out, "triton")
    for checkpoint in (1, 3, "sqrt"):
        got = mlp_outputs_and_grads(case, grad_out, "triton", checkpoint=checkpoint)
        for name, a, b in zip(MLP_RESULTS, got, save_all):
            assert rel_err(a, b) < 1e-12, f"{name} with checkpoint={checkpoint}"


@pytest.mark.usefixtures("nan_poison")
def test_mlp_empty_batch(triton_device):
    """The ops on 0 rows (residual_mlp_stack itself runs empty batches on the reference)."""
    case = make_mlp_stack_case(MlpStackSpec(7, 9, 3, (0,), True, "abs", True), torch.float32, 0).to(triton_device)
    out, states, signs = torch.ops.dmup.triton_residual_mlp_stack(case.x, *case.params, 0.5, "abs", True, True)
    assert out.shape == (0, 7) and states.shape == (2, 0, 7) and signs.shape == (3, 2, 0, 2)
    grads = torch.ops.dmup.triton_residual_mlp_stack_backward(
        out, case.x, states, signs, *case.params, 0.5, "abs", True
    )
    assert grads[0].shape == (0, 7)
    for grad, param in zip(grads[1:], case.params):
        assert torch.equal(grad, torch.zeros_like(param))


@pytest.mark.parametrize("activation", ["relu", "abs", "silu", "identity"])
@pytest.mark.parametrize("save", [True, False])
def test_opcheck_mlp_stack(activation, save, triton_device, seed):
    from dmup_kernels.triton.residual_mlp_stack import depth_fused_mlp_compiles

    if save and not depth_fused_mlp_compiles(torch.float64.itemsize, activation):
        pytest.skip("this Triton cannot compile the float64 MLP backward of relu and abs (FLOAT64_SIGN_BIT_DOTS)")
    case = make_mlp_stack_case(MlpStackSpec(7, 11, 2, (5,), True, activation, True), torch.float64, seed)
    case = case.to(triton_device)
    args = (case.x, *case.params, 0.5, activation, True)
    torch.library.opcheck(torch.ops.dmup.triton_residual_mlp_stack.default, (*args, save))
    if save:
        out, states, signs = torch.ops.dmup.triton_residual_mlp_stack(*args, True)
        backward_args = (torch.randn_like(out), case.x, states, signs, *case.params, 0.5, activation, True)
        torch.library.opcheck(torch.ops.dmup.triton_residual_mlp_stack_backward.default, backward_args)


@pytest.mark.parametrize("activation", ["relu", "abs", "silu"])
def test_traffic_model_counts_the_state_the_mlp_stack_saves(activation, triton_device, seed):
    """benchmarks.traffic's depth-fused MLP stack writes x_l and the sign bits of h1 once per layer: the bytes
    the op really keeps for backward, per layer."""
    from benchmarks.traffic import LayerShape, mlp_depth_fused_passes

    depth = 4
    case = make_mlp_stack_case(MlpStackSpec(21, 45, depth, (9,), False, activation, True), torch.float32, seed)
    case = case.to(triton_device)
    _, states, signs = torch.ops.dmup.triton_residual_mlp_stack(case.x, *case.params, 0.5, activation, True, True)
    kept = case.x.nbytes + states.nbytes + signs.nbytes  # x_0 is the op's input, kept by autograd
    shape = LayerShape(21, 9, activation, hidden_width=45)
    [(_, forward), *_] = mlp_depth_fused_passes(shape, training=True)
    assert kept == depth * (forward - 2 * shape.weight)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_half_precision_mlp_stack_kernels(activation, dtype, triton_device, seed):
    """The MLP kernels on half tensors (half GEMM operands, float32 arithmetic): output and gradients against
    the float64 reference from the same (rounded) inputs, by the 2x-eager rule."""
    from dmup_kernels.triton.residual_mlp_stack import mlp_stack_backward, mlp_stack_forward

    case = make_mlp_stack_case(MlpStackSpec(32, 40, 2, (19,), True, activation, True), dtype, seed)
    case = case.to(triton_device)
    grad_out = torch.randn_like(case.x)
    out, states, signs = mlp_stack_forward(case.x, *case.params, 0.5, activation, True, True)
    grads = mlp_stack_backward(grad_out, case.x, states, signs, *case.params, 0.5, activation, True)
    check_half_precision_kernels(
        MLP_RESULTS,
        [out, *grads],
        lambda *leaves: reference.residual_mlp_stack(*leaves, scale=0.5, activation=activation, mean_subtract=True),
        [case.x, *case.params],
        grad_out,
    )


@pytest.mark.parametrize(
    "setting,float32_dots",
    [
        ("pass", "tf32x3"),
        ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
        ('torch.set_float32_matmul_precision("high")', "tf32"),
        ('torch.backends.fp32_precision = "tf32"', "tf32"),
        ('torch.backends.cuda.matmul.fp32_precision = "tf32"', "tf32"),
        ('torch.backends.fp32_precision = "tf32"; torch.backends.cuda.matmul.fp32_precision = "ieee"', "tf32x3"),
    ],
)
def test_float32_dots_follow_torchs_tf32_setting(setting, float32_dots):
    """float32 tl.dots use plain TF32 exactly where torch lets float32 matmuls use it, whichever of torch's
    APIs said so (reading the legacy allow_tf32 raises after the new ones: each setting runs in a fresh process)."""
    code = (
        f"import torch\n{setting}\nfrom dmup_kernels.triton.tuning import input_precision\n"
        "print(input_precision(torch.float32), input_precision(torch.float64))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == [float32_dots, "ieee"], result.stderr
