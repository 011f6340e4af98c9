"""The fused op dmup::residual_stack: dmup_kernels.residual_stack on every backend ("cpp", "triton", "cuda")
against the float64 eager reference (docs/design.md §5) and call-to-call reproducibility; for "cpp" also
ResidualStack(backend="cpp"), gradcheck, opcheck, thread independence, saved-tensor memory, the module path,
empty batches and bad saved state. The Triton and CUDA specifics are in test_triton_kernels.py and
test_cuda_kernels.py.

Tolerances (docs/design.md §5.3, §5.5): float64 < 1e-12 and float32 < 1e-5 relative, for L <= 300; bfloat16 at
most 2x the error of eager bfloat16 plus a floor.
"""

from __future__ import annotations

import math

import pytest
import torch

import dmup_kernels
from dmup_kernels import ResidualStack, reference
from dmup_kernels._layout import StackSettings
from dmup_kernels.ops.residual_stack import STACK_BACKENDS

from conftest import OP_BACKENDS, OpLog, backend_device, graph_nodes, needs_cpp, num_threads, rel_err, saved_bytes
from parity import check_stack, check_within_twice_eager, run_stack, run_stack_reference, stack_kwargs
from sample_inputs import (
    ACTIVATIONS,
    BLOCKS,
    OP_STACK_LAYOUT_SPECS,
    OP_STACK_SPECS,
    SMALL_STACK_SPECS,
    StackCase,
    StackSpec,
    make_stack_case,
    random_tensor,
)

DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["f64", "f32"]
MASK_PLANES = {"relu": 1, "abs": 2, "gelu": 0, "silu": 0, "identity": 0}


def mask_planes(activation: str, block: str) -> int:
    """Sign-bit planes saved per element: only "post" needs them ("pre" keeps x_l, which has the sign)."""
    return MASK_PLANES[activation] if block == "post" else 0


# ---------------------------------------------------------------------------------------------------
# 1. parity with the float64 reference, every backend
# ---------------------------------------------------------------------------------------------------


def backend_cases(specs: list[StackSpec]) -> list:
    """pytest params (spec, backend): every spec on every backend of OP_BACKENDS, but triton takes only the
    specs of width <= 128, depth <= 17 and at most 64 rows, a representative subset (every small spec and
    about a third of the others): the interpreter runs each program in Python, where one of the larger
    cases takes from seconds to a minute. The wider Triton routes are tested in test_triton_kernels.py."""
    return [
        pytest.param(spec, backend, marks=param.marks, id=f"{spec.id}-{backend}")
        for spec in specs
        for param in OP_BACKENDS
        for backend in param.values
        if backend != "triton" or (spec.width <= 128 and spec.depth <= 17 and math.prod(spec.batch_shape) <= 64)
    ]


PARITY_SPECS = OP_STACK_SPECS + SMALL_STACK_SPECS


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec,backend", backend_cases(PARITY_SPECS))
def test_matches_reference(spec: StackSpec, backend, dtype, cpu_isa, seed):
    check_stack(make_stack_case(spec, dtype, seed).to(backend_device(backend)), dtype, backend)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec,backend", backend_cases(OP_STACK_LAYOUT_SPECS))
def test_leading_dims_and_strided_x(spec: StackSpec, backend, dtype, cpu_isa, seed):
    case = make_stack_case(spec, dtype, seed)
    assert case.x.is_contiguous() == (spec.layout == "contiguous")
    check_stack(case.to(backend_device(backend)), dtype, backend)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_strided_weight_and_bias(backend, seed):
    """Transposed weight and a sliced bias are read by value, not by memory layout."""
    spec = StackSpec(48, 3, (21,), "post", True, "gelu", True, "contiguous")
    case = make_stack_case(spec, torch.float64, seed)
    case.weight = case.weight.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(3, 96, dtype=torch.float64)
    wide[:, ::2] = case.bias
    case.bias = wide[:, ::2]
    assert not case.weight.is_contiguous() and not case.bias.is_contiguous()
    check_stack(case.to(backend_device(backend)), torch.float64, backend)


@pytest.mark.parametrize("checkpoint_every", [0, 2], ids=["save-all", "checkpoint2"])
@pytest.mark.parametrize("spec", [StackSpec(24, 5, (2, 7), "post", True, "abs", True, "contiguous"),
                                  StackSpec(16, 3, (9,), "pre", True, "silu", False, "contiguous")],
                         ids=lambda spec: spec.id)  # fmt: skip
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_contract_backward_matches_reference(spec: StackSpec, backend, checkpoint_every, seed):
    """Each backend's ``backward`` (what the ops' autograd rules call) on the state its ``forward`` left,
    against the reference backend's, in float64."""
    case = make_stack_case(spec, torch.float64, seed)
    settings = StackSettings(**stack_kwargs(case), checkpoint_every=checkpoint_every)
    grad_out = torch.randn(case.x.shape, dtype=torch.float64)

    def gradients(name: str, device: str) -> list[torch.Tensor]:
        stack = STACK_BACKENDS[name]
        x, weight, bias = (t.detach().to(device).requires_grad_() for t in (case.x, case.weight, case.bias))
        with torch.enable_grad():
            _, state = stack.forward(x, weight, bias, settings, True)
        return list(stack.backward(grad_out.to(device), state, weight, bias, settings))

    expected = gradients("reference", "cpu")
    for name, got, ref in zip(
        ("grad x", "grad weight", "grad bias"), gradients(backend, backend_device(backend)), expected
    ):
        assert got.shape == ref.shape, name
        assert rel_err(got, ref) < 1e-12, name


# ---------------------------------------------------------------------------------------------------
# 2. bfloat16
# ---------------------------------------------------------------------------------------------------

_BF16_SHAPES = [(48, 64, 17), (7, 3, 2), (96, 1, 1), (200, 17, 2), (64, 1000, 2)]  # (n, B, L)
BF16_SPECS = [
    StackSpec(width, depth, (batch,), block, index % 2 == 1, activation, index % 3 != 0, "contiguous")
    for index, (block, activation) in enumerate((b, a) for b in BLOCKS for a in ACTIVATIONS)
    for width, batch, depth in [_BF16_SHAPES[index % len(_BF16_SHAPES)]]
]
"""Every activation x block, rotating shapes, mean subtraction and bias."""


@needs_cpp
@pytest.mark.parametrize("spec", BF16_SPECS, ids=[s.id for s in BF16_SPECS])
def test_bfloat16_within_twice_eager_error(spec: StackSpec, seed):
    """bf16 in, bf16 out; error vs the float64 reference <= 2x eager bf16's error + 1e-3."""
    case = make_stack_case(spec, torch.bfloat16, seed)
    grad_out = torch.randn(case.x.shape, dtype=torch.bfloat16)
    got = run_stack(case, grad_out, "cpp")
    ref = run_stack_reference(case, grad_out)
    eager = run_stack_reference(case, grad_out, torch.bfloat16)
    check_within_twice_eager(("output", "grad x", "grad weight", "grad bias"), got, eager, ref, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# 3. gradcheck (float64)
# ---------------------------------------------------------------------------------------------------


def preactivations(x, weight, bias, scale, activation, block, mean_subtract) -> torch.Tensor:
    """Every value phi is applied to in the stack (h for "post", x_l for "pre"), flattened."""
    values = []
    for layer in range(weight.shape[0]):
        b = None if bias is None else bias[layer]
        h = torch.nn.functional.linear(x, weight[layer], b)
        values.append(h if block == "post" else x)
        layer_fn = reference.post_block if block == "post" else reference.pre_block
        x = layer_fn(x, weight[layer], b, scale=scale, activation=activation, mean_subtract=mean_subtract)
    return torch.cat([v.flatten() for v in values])


def away_from_kinks(spec: StackSpec, seed: int, margin: float = 1e-3) -> StackCase:
    """For relu/abs: the first case (seeds seed, seed+1, ...) whose pre-activations all have |.| >= margin,
    so finite differences (eps 1e-6) never cross a kink. Deterministic per test id."""
    for attempt in range(50):
        case = make_stack_case(spec, torch.float64, seed + attempt)
        if spec.activation not in ("relu", "abs"):
            return case
        pre = preactivations(
            case.x, case.weight, case.bias, case.scale, spec.activation, spec.block, spec.mean_subtract
        )
        if pre.abs().min().item() >= margin:
            return case
    pytest.fail("no seed with pre-activations away from the kinks")


GRADCHECK_SHAPES = [(5, 3, 3), (4, 2, 2), (1, 2, 3), (6, 1, 2), (3, 17, 2)]  # (n, B, L)
GRADCHECK_SPECS = [
    StackSpec(n, depth, (batch,), block, bias, activation, (i + int(bias)) % 2 == 0, "contiguous")
    for i, (activation, block) in enumerate((a, b) for a in ACTIVATIONS for b in BLOCKS)
    for bias in (False, True)
    for n, batch, depth in [GRADCHECK_SHAPES[(i + int(bias)) % len(GRADCHECK_SHAPES)]]
]


@needs_cpp
@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=[s.id for s in GRADCHECK_SPECS])
def test_gradcheck(spec: StackSpec, seed):
    case = away_from_kinks(spec, seed)
    kwargs = stack_kwargs(case)
    inputs = [case.x.requires_grad_(), case.weight.requires_grad_()]
    if case.bias is not None:
        inputs.append(case.bias.requires_grad_())

    def fn(x, weight, bias=None):
        return dmup_kernels.residual_stack(x, weight, bias, backend="cpp", **kwargs)

    with num_threads(1):  # many tiny calls: threads only add overhead
        assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 4. opcheck
# ---------------------------------------------------------------------------------------------------

OPCHECK_CASES = [  # (n, B, L, dtype, bias, activation, block, mean_subtract)
    (5, 3, 2, torch.float32, True, "relu", "post", True),
    (7, 17, 3, torch.float64, False, "abs", "post", False),
    (48, 1, 2, torch.float32, False, "gelu", "pre", False),
    (4, 33, 2, torch.float64, True, "silu", "pre", True),
    (9, 16, 1, torch.float32, True, "identity", "post", True),
    (6, 20, 2, torch.float64, True, "relu", "pre", False),
    (8, 5, 2, torch.float32, False, "abs", "pre", True),
]
OPCHECK_IDS = [
    f"n{c[0]}-B{c[1]}-L{c[2]}-{DTYPE_IDS[DTYPES.index(c[3])]}-{'bias' if c[4] else 'nobias'}-{c[5]}-{c[6]}"
    for c in OPCHECK_CASES
]


def op_args(
    n, batch, depth, dtype, bias, activation, block, mean_subtract, *, requires_grad=True, save_for_backward=True
):
    """Arguments of dmup::residual_stack (x of shape (B, n)); deterministic per shape."""
    generator = torch.Generator().manual_seed(1000 * n + batch)
    x = random_tensor((batch, n), dtype, generator).requires_grad_(requires_grad)
    weight = (random_tensor((depth, n, n), torch.float64, generator) / math.sqrt(n)).to(dtype)
    b = (0.1 * random_tensor((depth, n), torch.float64, generator)).to(dtype) if bias else None
    weight.requires_grad_(requires_grad)
    if b is not None:
        b.requires_grad_(requires_grad)
    return (x, weight, b, depth**-0.5, activation, block, mean_subtract, save_for_backward)


@needs_cpp
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck(case):
    args = op_args(*case)
    # the real op returns the mask planes the fake promises
    _, saved, mask = torch.ops.dmup.residual_stack(*args)
    n, batch, depth = case[:3]
    assert saved.shape == (depth, n, batch) and saved.dtype == case[3]
    assert mask.shape == (depth, mask_planes(case[5], case[6]), n, (batch + 15) // 16) and mask.dtype == torch.int16
    torch.library.opcheck(torch.ops.dmup.residual_stack.default, args)


@needs_cpp
@pytest.mark.parametrize("case", OPCHECK_CASES[::3], ids=OPCHECK_IDS[::3])
def test_opcheck_inference(case):
    """save_for_backward=False: the state comes back with 0 layers, in the real op and the fake alike."""
    args = op_args(*case, requires_grad=False, save_for_backward=False)
    torch.library.opcheck(torch.ops.dmup.residual_stack.default, args)


@needs_cpp
@pytest.mark.parametrize("case", OPCHECK_CASES[:4], ids=OPCHECK_IDS[:4])
def test_opcheck_backward_op(case):
    x, weight, bias, *settings, save = op_args(*case, requires_grad=False)
    _, saved, mask = torch.ops.dmup.residual_stack(x, weight, bias, *settings, save)
    args = (torch.randn_like(x), saved, mask, weight, bias, *settings)
    torch.library.opcheck(
        torch.ops.dmup.residual_stack_backward.default, args, test_utils=("test_schema", "test_faketensor")
    )


# ---------------------------------------------------------------------------------------------------
# 5. bitwise independence of the thread count ("cpp"); call-to-call reproducibility (every backend)
# ---------------------------------------------------------------------------------------------------


THREAD_SPECS = [
    StackSpec(200, 5, (1000,), "post", True, "relu", True, "contiguous"),  # several row tiles per thread
    StackSpec(48, 3, (1000,), "pre", False, "abs", False, "contiguous"),
    StackSpec(96, 17, (3,), "post", False, "gelu", False, "contiguous"),  # one partial tile
    StackSpec(64, 2, (100,), "pre", True, "silu", True, "contiguous"),
    StackSpec(130, 9, (70,), "post", True, "identity", True, "contiguous"),  # the last tile partial
    StackSpec(256, 2, (40,), "post", True, "relu", True, "contiguous"),  # wide: a tile size that varies with threads
]


def grads_of(case: StackCase, grad_out: torch.Tensor, backend: str = "cpp") -> list[torch.Tensor]:
    """Output and gradients from fresh leaves (so repeated calls do not accumulate)."""
    x = case.x.detach().clone().requires_grad_()
    weight = case.weight.detach().clone().requires_grad_()
    bias = None if case.bias is None else case.bias.detach().clone().requires_grad_()
    out = dmup_kernels.residual_stack(x, weight, bias, backend=backend, **stack_kwargs(case))
    out.backward(grad_out)
    return [out.detach(), x.grad, weight.grad] + ([] if bias is None else [bias.grad])


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec", THREAD_SPECS, ids=[s.id for s in THREAD_SPECS])
def test_bitwise_independent_of_threads(spec: StackSpec, dtype, cpu_isa, seed):
    case = make_stack_case(spec, dtype, seed)
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    with num_threads(1):
        one = grads_of(case, grad_out)
    for threads in (2, 3):  # 3: a thread in the middle of the chain of weight-gradient sums
        with num_threads(threads):
            many = grads_of(case, grad_out)
        for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), one, many):
            assert torch.equal(a, b), f"{name}: 1 thread != {threads} threads"


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec,backend", backend_cases(THREAD_SPECS))
def test_bitwise_call_to_call(spec: StackSpec, backend, dtype, cpu_isa, seed):
    """The same call twice gives the same bits (docs/design.md §3.6)."""
    case = make_stack_case(spec, dtype, seed).to(backend_device(backend))
    grad_out = torch.randn(case.x.shape, dtype=dtype).to(case.x.device)
    first, again = grads_of(case, grad_out, backend), grads_of(case, grad_out, backend)
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), first, again):
        assert torch.equal(a, b), f"{name}: two calls differ"


# ---------------------------------------------------------------------------------------------------
# 6. saved-tensor memory
# ---------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize(
    "activation,batch,width,depth",
    [
        ("relu", 37, 48, 6),
        ("relu", 64, 96, 3),
        ("abs", 37, 48, 6),
        ("gelu", 37, 48, 6),
        ("silu", 100, 17, 4),
        ("identity", 5, 64, 3),
    ],
)
@pytest.mark.parametrize("block", BLOCKS)
def test_saved_bytes_per_layer(activation, batch, width, depth, block, cpu_isa, seed):
    """Per layer at most B*n*4 (x_l in float32) + planes * (B*n/8 + 2n) bytes, planes = 1 for relu, 2 for
    abs, 0 for smooth activations; 2n bytes per plane is the rounding of each mask row up to whole 16-bit
    words when B is not a multiple of 16. Much less than the eager reference saves."""
    x = torch.randn(batch, width, requires_grad=True)
    weight = (torch.randn(depth, width, width) / math.sqrt(width)).requires_grad_()
    bias = (0.1 * torch.randn(depth, width)).requires_grad_()
    kwargs = dict(scale=depth**-0.5, activation=activation, block=block, mean_subtract=True)

    def run(backend):
        return lambda: dmup_kernels.residual_stack(x, weight, bias, backend=backend, **kwargs)

    ours = saved_bytes(run("cpp"), exclude=[weight, bias])
    eager = saved_bytes(run("reference"), exclude=[weight, bias])
    planes = mask_planes(activation, block)
    per_layer = batch * width * 4 + planes * (batch * width / 8 + 2 * width)
    assert ours <= depth * per_layer, f"{ours} bytes saved > {depth} x {per_layer}"
    assert ours >= depth * batch * width * 4  # x_l of every layer: the state is what we think it is
    # Eager saves two (B, n) tensors per layer (x_l and h_l, or phi(x_l) and x_l), except where phi is
    # identity (x_l only), and "pre" relu, where phi's output tells its own sign (relu(x_l) only).
    if activation == "identity" or (block == "pre" and activation == "relu"):
        assert ours <= eager + depth * planes * (batch * width / 8 + 2 * width), f"fused {ours}, eager {eager}"
    else:
        assert ours < 0.6 * eager, f"fused saves {ours} bytes, eager reference {eager}"


# ---------------------------------------------------------------------------------------------------
# the saved state (stack_kernel.h): saved[l] = x_l^T; for block "post" the mask bits are [h > 0] / [h < 0]
# ---------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("block", BLOCKS)
def test_saved_state_layout(activation, block, dtype, cpu_isa, seed):
    """The bits are packed per row the same way whatever the vector width of the ISA (37 rows: a
    partial word, and vectors that end inside a word)."""
    batch, width, depth = 37, 20, 4
    tolerance = 1e-13 if dtype == torch.float64 else 1e-6
    x, weight, bias, scale, *_ = op_args(width, batch, depth, dtype, True, activation, block, True, requires_grad=False)
    out, saved, mask = torch.ops.dmup.residual_stack(x, weight, bias, scale, activation, block, True, True)
    assert saved.shape == (depth, width, batch) and saved.is_contiguous()
    assert mask.shape == (depth, mask_planes(activation, block), width, 3) and mask.dtype == torch.int16
    words = mask.to(torch.int32) & 0xFFFF
    bits = (words.unsqueeze(-1) >> torch.arange(16)) & 1  # (L, planes, n, words, 16)
    bits = bits.flatten(-2)[..., :batch].bool()  # (L, planes, n, B)
    x_layer = x
    layer_fn = reference.post_block if block == "post" else reference.pre_block
    for layer in range(depth):
        assert rel_err(saved[layer], x_layer.T) < tolerance, f"saved[{layer}]"
        if block == "post" and activation in ("relu", "abs"):
            # ("pre" takes the sign of phi's input from saved x_l itself)
            h = torch.nn.functional.linear(x_layer, weight[layer], bias[layer]).T
            clear = h.abs() > 1e3 * tolerance  # signs that rounding cannot flip
            assert torch.equal(bits[layer, 0][clear], (h > 0)[clear]), f"plane 0, layer {layer}"
            if activation == "abs":
                assert torch.equal(bits[layer, 1][clear], (h < 0)[clear]), f"plane 1, layer {layer}"
        x_layer = layer_fn(x_layer, weight[layer], bias[layer], scale=scale, activation=activation, mean_subtract=True)
    assert rel_err(out, x_layer) < tolerance


# ---------------------------------------------------------------------------------------------------
# inference: save_for_backward=False keeps no state
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# large buffers: the saved state, dh and dW from 2 MiB on come from a pool and are recycled
# ---------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
def test_recycled_large_buffers(cpu_isa, seed):
    """A stack whose saved state, dh and dW each pass 2 MiB, run three times: every run matches the
    reference and the first bitwise, so a recycled buffer (NaN-filled again in this mode) is rewritten
    whole. The second case has another shape of the same byte size, so it reuses the first's buffers."""
    spec = StackSpec(64, 20, (600,), "post", True, "relu", True, "contiguous")  # 3 MiB of saved state
    assert spec.depth * spec.width * spec.batch_shape[0] * 4 > 2 << 20
    case = make_stack_case(spec, torch.float32, seed)
    grad_out = torch.randn(case.x.shape)
    first = grads_of(case, grad_out)
    for _ in range(2):
        for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), first, grads_of(case, grad_out)):
            assert torch.equal(a, b), f"{name} differs on a recycled buffer"
    check_stack(case, torch.float32, "cpp")
    same_bytes = StackSpec(64, 20, (600,), "pre", False, "gelu", False, "contiguous")
    check_stack(make_stack_case(same_bytes, torch.float32, seed + 1), torch.float32, "cpp")


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("activation", ["relu", "abs", "silu"])
def test_inference_saves_nothing(activation, seed):
    args = op_args(33, 40, 3, torch.float32, True, activation, "post", True, requires_grad=False)
    out, saved, mask = torch.ops.dmup.residual_stack(*args[:-1], False)
    assert saved.shape == (0, 33, 40) and mask.shape == (0, mask_planes(activation, "post"), 33, 3)
    trained, _, _ = torch.ops.dmup.residual_stack(*args[:-1], True)
    assert torch.equal(out, trained)
    # the Python API saves nothing when no gradient can be needed, and computes the same output
    x, weight, bias, scale = args[:4]
    calls = []
    for grad_mode, requires_grad in ((False, True), (True, False), (True, True)):
        with torch.set_grad_enabled(grad_mode), OpLog() as log:
            y = dmup_kernels.residual_stack(
                x.detach().requires_grad_(requires_grad),
                weight,
                bias,
                scale=scale,
                activation=activation,
                backend="cpp",
            )
        assert torch.equal(y.detach(), out)
        calls.append(log.args["dmup.residual_stack.default"][-1])
    assert calls == [False, False, True]


@needs_cpp
def test_backward_after_inference_forward_raises(seed):
    x, weight, bias, *settings, _ = op_args(9, 5, 2, torch.float64, True, "relu", "post", True)
    out, _, _ = torch.ops.dmup.residual_stack(x, weight, bias, *settings, False)
    with pytest.raises(RuntimeError, match="save_for_backward"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------------
# 7. the module path uses the fused op
# ---------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp", "auto"])
@pytest.mark.parametrize("bias", [False, True])
def test_module_uses_fused_op(backend, bias, seed):
    depth = 17
    module = ResidualStack(48, depth, bias=bias, backend=backend)
    x = torch.randn(2, 5, 48, requires_grad=True)
    with OpLog() as log:
        out = module(x)
    assert log.calls.count("dmup.residual_stack.default") == 1, log.calls
    assert not [c for c in log.calls if "mm" in c or "linear" in c], log.calls
    nodes = graph_nodes(out)
    fused = [name for name in nodes if "residual_stack" in name]
    assert len(fused) == 1, nodes
    assert len(nodes) < 8, nodes  # not one node per layer
    with OpLog() as log:
        out.sum().backward()
    assert log.calls.count("dmup.residual_stack_backward.default") == 1, log.calls
    assert x.grad.shape == x.shape and module.weight.grad.shape == module.weight.shape
    # the eager reference builds per-layer nodes: the graph check above does distinguish them
    eager = ResidualStack(48, depth, bias=bias, backend="reference")
    assert len(graph_nodes(eager(x))) > depth


# ---------------------------------------------------------------------------------------------------
# 8. empty batch
# ---------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 48), (0, 1)])
@pytest.mark.parametrize("activation", ["relu", "abs", "gelu"])
def test_empty_batch(shape, activation):
    width, depth = shape[-1], 3
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(depth, width, width, requires_grad=True)
    bias = torch.randn(depth, width, requires_grad=True)
    out = dmup_kernels.residual_stack(x, weight, bias, scale=0.5, activation=activation, backend="cpp")
    assert out.shape == shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize(("batch", "width"), [(3, 0), (0, 0), (0, 5)])
def test_empty_direct_ops_match_their_fake_rules(batch, width):
    """No rows or no features: the ops return empty tensors of the shapes their fake rules give (opcheck)."""
    weight, grad = torch.randn(2, width, width), torch.randn(batch, width)
    args = (torch.randn(batch, width), weight, None, 0.5, "relu", "post", True, True, 0)
    torch.library.opcheck(torch.ops.dmup.residual_stack.default, args, test_utils=("test_schema", "test_faketensor"))
    _, saved, mask = torch.ops.dmup.residual_stack(*args)
    backward_args = (grad, saved, mask, weight, None, 0.5, "relu", "post", True, 0)
    torch.library.opcheck(
        torch.ops.dmup.residual_stack_backward.default, backward_args, test_utils=("test_schema", "test_faketensor")
    )
    grad_x, grad_weight, _ = torch.ops.dmup.residual_stack_backward(*backward_args)
    assert grad_x.shape == (batch, width) and torch.equal(grad_weight, torch.zeros_like(weight))


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_empty_batch_direct_op(activation):
    x = torch.randn(0, 7, requires_grad=True)
    weight = torch.randn(3, 7, 7, requires_grad=True)
    bias = torch.randn(3, 7, requires_grad=True)
    out, saved, mask = torch.ops.dmup.residual_stack(x, weight, bias, 0.5, activation, "post", True, True)
    assert out.shape == (0, 7) and saved.shape == (3, 7, 0)
    assert mask.shape == (3, mask_planes(activation, "post"), 7, 0)
    out.sum().backward()
    assert x.grad.shape == (0, 7)
    assert torch.equal(bias.grad, torch.zeros_like(bias))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


# ---------------------------------------------------------------------------------------------------
# 9. bad saved state in the backward op
# ---------------------------------------------------------------------------------------------------


def _bad_state_cases():
    # forward state of relu, n = 7, B = 20 (2 mask words), L = 3
    def good(activation="relu", save=True):
        x = torch.randn(20, 7)
        weight = torch.randn(3, 7, 7)
        _, saved, mask = torch.ops.dmup.residual_stack(x, weight, None, 0.5, activation, "post", True, save)
        return x, weight, saved, mask

    def call(saved_fn=lambda s: s, mask_fn=lambda m: m, activation="relu", saved_activation="relu", save=True):
        def run():
            x, weight, saved, mask = good(saved_activation, save)
            torch.ops.dmup.residual_stack_backward(
                torch.randn_like(x), saved_fn(saved), mask_fn(mask), weight, None, 0.5, activation, "post", True
            )

        return run

    return [
        ("saved-depth", call(saved_fn=lambda s: s[:2]), ValueError, "saved"),
        ("saved-batch", call(saved_fn=lambda s: s[..., :19].contiguous()), ValueError, "saved"),
        ("saved-batch-major", call(saved_fn=lambda s: s.permute(0, 2, 1).contiguous()), ValueError, "saved"),
        ("saved-2d", call(saved_fn=lambda s: s.reshape(21, 20)), ValueError, "saved"),
        (
            "saved-noncontiguous",
            call(saved_fn=lambda s: s.transpose(1, 2).contiguous().transpose(1, 2)),
            ValueError,
            "saved",
        ),
        ("saved-dtype", call(saved_fn=lambda s: s.double()), TypeError, "saved"),
        ("state-of-inference-forward", call(save=False), ValueError, "saved"),  # 0 layers kept
        ("saved-3-layers-mask-0", call(mask_fn=lambda m: m[:0]), ValueError, "mask"),
        ("mask-words", call(mask_fn=lambda m: m[..., :1].contiguous()), ValueError, "mask"),
        ("mask-planes-abs", call(activation="abs"), ValueError, "mask"),  # relu's 1 plane where abs needs 2
        ("mask-planes-gelu", call(activation="gelu"), ValueError, "mask"),
        ("mask-planes-relu", call(saved_activation="gelu"), ValueError, "mask"),  # gelu's empty mask where relu needs 1
        ("mask-dtype", call(mask_fn=lambda m: m.to(torch.int32)), TypeError, "mask"),
        ("mask-width", call(mask_fn=lambda m: m[:, :, :6].contiguous()), ValueError, "mask"),
        (
            "mask-noncontiguous",
            call(mask_fn=lambda m: m.transpose(2, 3).contiguous().transpose(2, 3)),
            ValueError,
            "mask",
        ),
        ("mask-flat", call(mask_fn=lambda m: m.flatten()), ValueError, "mask"),
    ]


BAD_STATE_CASES = _bad_state_cases()


@needs_cpp
@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_STATE_CASES], ids=[c[0] for c in BAD_STATE_CASES])
def test_backward_op_rejects_bad_state(call, error, match):
    with pytest.raises(error, match=match):
        call()
