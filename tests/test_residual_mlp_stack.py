"""The MLP stack dmup::residual_mlp_stack: dmup_kernels.residual_mlp_stack on every backend against the float64
eager reference (docs/design.md §5); for "cpp" also gradcheck, opcheck, the saved state (x_l and the sign bits of
the hidden pre-activation, never the hidden activation), bitwise independence of the thread count and depth
checkpoints bitwise equal to saving every layer on every instruction set, bfloat16, bad saved state; and
ResidualMLPStack: conversions, DepthMuPNet(hidden_width=...), param_groups, torch.compile and torch.func, empty
batches.

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
from dmup_kernels._layout import MlpStackSettings, MlpWeights
from dmup_kernels.ops.residual_mlp_stack import MLP_STACK_BACKENDS

from conftest import OP_BACKENDS, OpLog, backend_device, graph_nodes, needs_cpp, num_threads, rel_err, saved_bytes
from parity import (
    MLP_RESULTS,
    TOLERANCE,
    check_mlp_stack,
    check_within_twice_eager,
    mlp_outputs_and_grads,
    mlp_stack_kwargs,
    run_mlp_stack_reference,
)
from sample_inputs import (
    ACTIVATIONS,
    MLP_STACK_LAYOUT_SPECS,
    MLP_STACK_SPECS,
    MlpStackCase,
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


@pytest.mark.parametrize("checkpoint_every", [0, 2], ids=["save-all", "checkpoint2"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_contract_backward_matches_reference(backend, checkpoint_every, seed):
    """Each backend's ``backward`` (what the autograd rules call) on the state its ``forward`` left, against the
    reference backend's, in float64; bias1 without bias2, so each bias's gradient is its own."""
    case = make_mlp_stack_case(MlpStackSpec(12, 20, 5, (2, 7), True, "abs", True), torch.float64, seed)
    settings = MlpStackSettings(**mlp_stack_kwargs(case), checkpoint_every=checkpoint_every)
    grad_out = torch.randn(case.x.shape, dtype=torch.float64)

    def gradients(name: str, device: str) -> list[torch.Tensor | None]:
        stack = MLP_STACK_BACKENDS[name]
        x, weight1, weight2, bias1 = (t.detach().to(device).requires_grad_() for t in (case.x, *case.params[:3]))
        weights = MlpWeights(weight1, weight2, bias1, None)
        with torch.enable_grad():
            _, state = stack.forward(x, weights, settings, True)
        return list(stack.backward(grad_out.to(device), state, weights, settings))

    expected = gradients("reference", "cpu")
    for name, got, ref in zip(MLP_RESULTS[1:], gradients(backend, backend_device(backend)), expected):
        if ref is None:
            assert got is None, name
            continue
        assert got.shape == ref.shape and rel_err(got, ref) < 1e-12, name


# ---------------------------------------------------------------------------------------------------
# 2. the C++ op: bfloat16, gradcheck, opcheck, threads, checkpoints, the saved state
# ---------------------------------------------------------------------------------------------------

BF16_SPECS = [
    MlpStackSpec(32, 128, 17, (64,), False, "relu", False),
    MlpStackSpec(7, 5, 2, (3,), True, "abs", True),
    MlpStackSpec(96, 64, 1, (1,), True, "gelu", False),
    MlpStackSpec(64, 256, 2, (1000,), False, "silu", True),
    MlpStackSpec(200, 1, 2, (17,), True, "identity", True),
]


@needs_cpp
@pytest.mark.parametrize("spec", BF16_SPECS, ids=[s.id for s in BF16_SPECS])
def test_bfloat16_within_twice_eager_error(spec: MlpStackSpec, seed):
    """bf16 in, bf16 out; error vs the float64 reference <= 2x eager bf16's error + 1e-3 (docs/design.md §5.5)."""
    case = make_mlp_stack_case(spec, torch.bfloat16, seed)
    grad_out = torch.randn(case.x.shape, dtype=torch.bfloat16)
    got = mlp_outputs_and_grads(case, grad_out, "cpp")
    ref = run_mlp_stack_reference(case, grad_out)
    eager = run_mlp_stack_reference(case, grad_out, torch.bfloat16)
    check_within_twice_eager(MLP_RESULTS, got, eager, ref, torch.bfloat16)


def hidden_preactivations(case: MlpStackCase) -> torch.Tensor:
    """Every h1 = x_l W1_l^T + b1_l of the stack, flattened."""
    states = reference.residual_mlp_stream(case.x, *case.params, **mlp_stack_kwargs(case))
    values = [
        torch.nn.functional.linear(x, case.weight1[l], None if case.bias1 is None else case.bias1[l])
        for l, x in enumerate(states[:-1])
    ]
    return torch.cat([v.flatten() for v in values])


def away_from_kinks(spec: MlpStackSpec, seed: int, margin: float = 1e-3) -> MlpStackCase:
    """For relu/abs: the first case (seeds seed, seed+1, ...) whose hidden pre-activations all have |.| >= margin,
    so finite differences never cross a kink."""
    for attempt in range(100):
        case = make_mlp_stack_case(spec, torch.float64, seed + attempt)
        if spec.activation not in ("relu", "abs") or hidden_preactivations(case).abs().min().item() >= margin:
            return case
    pytest.fail("no seed with hidden pre-activations away from the kinks")


GRADCHECK_SPECS = [
    MlpStackSpec(n, m, depth, (batch,), bias, activation, (i + int(bias)) % 2 == 0)
    for i, activation in enumerate(ACTIVATIONS)
    for bias in (False, True)
    for n, m, batch, depth in [((4, 3, 3, 2), (3, 6, 17, 2), (1, 2, 2, 3), (5, 1, 4, 2))[(i + int(bias)) % 4]]
]


@needs_cpp
@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=[s.id for s in GRADCHECK_SPECS])
def test_gradcheck(spec: MlpStackSpec, seed):
    case = away_from_kinks(spec, seed)
    inputs = [t.requires_grad_() for t in (case.x, *case.params) if t is not None]

    def fn(x, weight1, weight2, bias1=None, bias2=None):
        return dmup_kernels.residual_mlp_stack(
            x, weight1, weight2, bias1, bias2, backend="cpp", **mlp_stack_kwargs(case)
        )

    with num_threads(1):  # many tiny calls: threads only add overhead
        assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-8, rtol=1e-6)


OPCHECK_CASES = [  # (n, m, B, L, dtype, bias, activation, mean_subtract, checkpoint_every)
    (5, 7, 3, 2, torch.float32, True, "relu", True, 0),
    (7, 4, 17, 3, torch.float64, False, "abs", False, 0),
    (8, 33, 1, 2, torch.float32, False, "gelu", False, 0),
    (4, 9, 33, 2, torch.float64, True, "silu", True, 0),
    (9, 16, 16, 1, torch.float32, True, "identity", True, 0),
    (6, 10, 19, 5, torch.float64, True, "abs", True, 2),
]
OPCHECK_IDS = [
    f"n{c[0]}-m{c[1]}-B{c[2]}-L{c[3]}-{c[4]}-{c[6]}-every{c[8]}".replace("torch.", "") for c in OPCHECK_CASES
]


def op_args(n, m, batch, depth, dtype, bias, activation, mean_subtract, checkpoint_every, *, save=True, grad=True):
    """Arguments of dmup::residual_mlp_stack (x of shape (B, n)); deterministic per shape."""
    spec = MlpStackSpec(n, m, depth, (batch,), bias, activation, mean_subtract)
    case = make_mlp_stack_case(spec, dtype, 1000 * n + batch)
    tensors = [None if t is None else t.requires_grad_(grad) for t in (case.x, *case.params)]
    return (*tensors, case.scale, activation, mean_subtract, save, checkpoint_every)


@needs_cpp
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck(case):
    n, m, batch, depth, dtype, _, activation, _, every = case
    args = op_args(*case)
    _, saved, mask = torch.ops.dmup.residual_mlp_stack(*args)
    kept, masked = (-(-depth // every), 0) if every else (depth, depth)
    planes = {"relu": 1, "abs": 2}.get(activation, 0)
    assert saved.shape == (kept, n, batch) and saved.dtype == dtype
    assert mask.shape == (masked, planes, m, (batch + 15) // 16) and mask.dtype == torch.int16
    torch.library.opcheck(torch.ops.dmup.residual_mlp_stack.default, args)
    inference = op_args(*case, save=False, grad=False)
    torch.library.opcheck(torch.ops.dmup.residual_mlp_stack.default, inference)
    x, *params, scale, _, mean_subtract, _, _ = op_args(*case, grad=False)
    _, saved, mask = torch.ops.dmup.residual_mlp_stack(*op_args(*case, grad=False))
    backward_args = (torch.randn_like(x), saved, mask, *params, scale, activation, mean_subtract, every)
    torch.library.opcheck(
        torch.ops.dmup.residual_mlp_stack_backward.default, backward_args, test_utils=("test_schema", "test_faketensor")
    )


THREAD_SPECS = [
    MlpStackSpec(64, 128, 5, (1000,), True, "relu", True),  # several row tiles per thread
    MlpStackSpec(32, 300, 3, (1000,), False, "abs", False),
    MlpStackSpec(96, 64, 9, (3,), False, "gelu", False),  # threads share one tile's features
    MlpStackSpec(7, 5, 2, (100,), True, "silu", True),
    MlpStackSpec(130, 257, 4, (70,), True, "identity", True),
]


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spec", THREAD_SPECS, ids=[s.id for s in THREAD_SPECS])
def test_bitwise_independent_of_threads_and_checkpoints(spec: MlpStackSpec, dtype, cpu_isa, seed):
    """1, 2 and 3 threads (3: one in the middle of the chain of weight-gradient sums), saving every layer or
    checkpoints every 1, 2 (dividing no depth here but 2 layers) or L + 1 layers and "sqrt": the same bits
    (docs/design.md §3.6, §4.4), and call to call."""
    case = make_mlp_stack_case(spec, dtype, seed)
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    with num_threads(2):
        expected = mlp_outputs_and_grads(case, grad_out, "cpp")
        assert all(torch.equal(a, b) for a, b in zip(mlp_outputs_and_grads(case, grad_out, "cpp"), expected)
                   if a is not None), "two calls differ"  # fmt: skip
    for threads, checkpoint in ((1, None), (3, None), (1, 1), (2, 2), (1, spec.depth + 1), (2, "sqrt"), (3, 2)):
        with num_threads(threads):
            got = mlp_outputs_and_grads(case, grad_out, "cpp", checkpoint=checkpoint)
        for name, a, b in zip(MLP_RESULTS, got, expected):
            assert (a is None and b is None) or torch.equal(a, b), (
                f"{name}: {threads} thread(s), checkpoint={checkpoint}"
            )


SETTINGS = [(a, ms, bias) for a in ACTIVATIONS for ms in (True, False) for bias in (False, True)]


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation,mean_subtract,bias", SETTINGS, ids=["-".join(map(str, s)) for s in SETTINGS])
def test_checkpoints_bitwise_equal_to_saving_every_layer(activation, mean_subtract, bias, dtype, cpu_isa, seed):
    case = make_mlp_stack_case(MlpStackSpec(24, 40, 7, (37,), bias, activation, mean_subtract), dtype, seed)
    grad_out = torch.randn(case.x.shape, dtype=dtype)
    save_all = mlp_outputs_and_grads(case, grad_out, "cpp")
    for checkpoint in (1, 3, 7, 11, "sqrt"):
        got = mlp_outputs_and_grads(case, grad_out, "cpp", checkpoint=checkpoint)
        for name, a, b in zip(MLP_RESULTS, got, save_all):
            assert (a is None and b is None) or torch.equal(a, b), f"{name} with checkpoint={checkpoint}"


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saved_state_layout(activation, dtype, cpu_isa, seed):
    """saved[l] = x_l^T; for relu/abs the sign bits of h1 = x_l W1_l^T + b1_l per hidden feature, packed as the
    stack's (37 rows: a partial word, and vectors that end inside a word)."""
    n, m, batch, depth = 20, 27, 37, 4
    x, w1, w2, b1, b2, scale, *_ = op_args(n, m, batch, depth, dtype, True, activation, True, 0, grad=False)
    out, saved, mask = torch.ops.dmup.residual_mlp_stack(x, w1, w2, b1, b2, scale, activation, True, True)
    tolerance = 1e-13 if dtype == torch.float64 else 1e-6
    planes = {"relu": 1, "abs": 2}.get(activation, 0)
    assert saved.shape == (depth, n, batch) and mask.shape == (depth, planes, m, 3)
    bits = ((mask.to(torch.int32) & 0xFFFF).unsqueeze(-1) >> torch.arange(16)) & 1
    bits = bits.flatten(-2)[..., :batch].bool()  # (L, planes, m, B)
    states = reference.residual_mlp_stream(x, w1, w2, b1, b2, scale=scale, activation=activation, mean_subtract=True)
    for layer in range(depth):
        assert rel_err(saved[layer], states[layer].T) < tolerance, f"saved[{layer}]"
        h = torch.nn.functional.linear(states[layer], w1[layer], b1[layer]).T
        clear = h.abs() > 1e3 * tolerance  # signs that rounding cannot flip
        for plane, expected in enumerate([h > 0, h < 0][:planes]):
            assert torch.equal(bits[layer, plane][clear], expected[clear]), f"plane {plane}, layer {layer}"
    assert rel_err(out, states[-1]) < tolerance


@needs_cpp
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saved_bytes_per_layer(activation, seed):
    """Per layer at most B n 4 bytes (x_l in float32) plus the sign bits, planes * (B m / 8 + 2 m) bytes: never
    the (B, m) hidden activation, which the eager reference keeps (with h1, h2 and x_l)."""
    n, m, batch, depth = 24, 96, 37, 5
    case = make_mlp_stack_case(MlpStackSpec(n, m, depth, (batch,), True, activation, True), torch.float32, seed)
    x, *params = (t.requires_grad_() for t in (case.x, *case.params))

    def run(backend):
        return lambda: dmup_kernels.residual_mlp_stack(x, *params, backend=backend, **mlp_stack_kwargs(case))

    ours = saved_bytes(run("cpp"), exclude=params)
    eager = saved_bytes(run("reference"), exclude=params)
    planes = {"relu": 1, "abs": 2}.get(activation, 0)
    assert depth * batch * n * 4 <= ours <= depth * (batch * n * 4 + planes * (batch * m / 8 + 2 * m))
    assert ours < batch * m * 4 * depth / 2 and ours < eager / 4, (ours, eager)


@needs_cpp
@pytest.mark.parametrize("checkpoint", [None, 2])
def test_module_uses_the_fused_op(checkpoint, seed):
    stack = ResidualMLPStack(16, 40, 9, bias=True, backend="auto", checkpoint=checkpoint)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with OpLog() as log:
        out = stack(x)
    assert log.calls.count("dmup.residual_mlp_stack.default") == 1, log.calls
    assert not [c for c in log.calls if "mm" in c or "linear" in c], log.calls
    assert len(graph_nodes(out)) < 10  # not one node per layer
    with OpLog() as log:
        out.sum().backward()
    assert log.calls.count("dmup.residual_mlp_stack_backward.default") == 1, log.calls
    assert all(p.grad is not None for p in stack.parameters())


@needs_cpp
def test_inference_saves_nothing_and_backward_raises(seed):
    x, *params, scale, activation, ms, _, every = op_args(9, 12, 20, 3, torch.float32, True, "relu", True, 0)
    out, saved, mask = torch.ops.dmup.residual_mlp_stack(x, *params, scale, activation, ms, False, every)
    assert saved.shape == (0, 9, 20) and mask.shape == (0, 1, 12, 2)
    trained, _, _ = torch.ops.dmup.residual_mlp_stack(x, *params, scale, activation, ms, True, every)
    assert torch.equal(out, trained)
    with pytest.raises(RuntimeError, match="save_for_backward"):
        out.sum().backward()
    with torch.no_grad(), OpLog() as log:
        dmup_kernels.residual_mlp_stack(x, *params, scale=scale, activation=activation, mean_subtract=ms)
    assert log.args["dmup.residual_mlp_stack.default"][8] is False  # save_for_backward


def _bad_state_cases():
    # forward state of abs, n = 7, m = 9, B = 20 (2 mask words), L = 3
    def call(saved_fn=lambda s: s, mask_fn=lambda m: m, activation="abs", every=0):
        def run():
            x, w1, w2 = torch.randn(20, 7), torch.randn(3, 9, 7), torch.randn(3, 7, 9)
            _, saved, mask = torch.ops.dmup.residual_mlp_stack(x, w1, w2, None, None, 0.5, "abs", True, True)
            torch.ops.dmup.residual_mlp_stack_backward(
                torch.randn_like(x), saved_fn(saved), mask_fn(mask), w1, w2, None, None, 0.5, activation, True, every
            )

        return run

    saved_shape = r"saved \(the state returned by the forward\) must have shape \(saved layers, width, batch\)"
    mask_shape = r"mask \(the sign bits returned by residual_mlp_stack\) must have shape .* = "
    return [
        ("saved-depth", call(saved_fn=lambda s: s[:2]), ValueError, saved_shape + r" = \[3, 7, 20\]"),
        ("saved-batch-major", call(saved_fn=lambda s: s.permute(0, 2, 1).contiguous()), ValueError, saved_shape),
        ("saved-strided", call(saved_fn=lambda s: s.permute(0, 2, 1).contiguous().permute(0, 2, 1)), ValueError,
         "saved must be contiguous"),
        ("saved-dtype", call(saved_fn=lambda s: s.double()), TypeError, r"saved .* must have the dtype of grad_out"),
        ("checkpoints", call(every=2), ValueError, saved_shape + r" = \[2, 7, 20\]"),
        ("mask-planes-relu", call(activation="relu"), ValueError, mask_shape + r"\[3, 1, 9, 2\]"),
        ("mask-features", call(mask_fn=lambda m: m[:, :, :7].contiguous()), ValueError, mask_shape + r"\[3, 2, 9, 2\]"),
        ("mask-dtype", call(mask_fn=lambda m: m.to(torch.int32)), TypeError, "mask must be int16"),
    ]  # fmt: skip


BAD_STATE_CASES = _bad_state_cases()


@needs_cpp
@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_STATE_CASES], ids=[c[0] for c in BAD_STATE_CASES])
def test_backward_op_rejects_bad_state(call, error, match):
    with pytest.raises(error, match=match):
        call()


@needs_cpp
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: torch.ops.dmup.residual_mlp_stack(torch.randn(4, 8), torch.randn(3, 5, 8), torch.randn(3, 8, 6), None,
                                                   None, 0.5, "relu", False, True), r"weight2 must have shape"),
        (lambda: torch.ops.dmup.residual_mlp_stack(torch.randn(4, 8), torch.randn(3, 0, 8), torch.randn(3, 8, 0), None,
                                                   None, 0.5, "relu", False, True), r"hidden_width >= 1"),
        (lambda: torch.ops.dmup.residual_mlp_stack(torch.randn(4, 8), torch.randn(3, 5, 8), torch.randn(3, 8, 5),
                                                   torch.randn(3, 8), None, 0.5, "relu", False, True), r"bias1"),
        (lambda: torch.ops.dmup.residual_mlp_stack(torch.randn(4, 8), torch.randn(3, 5, 8), torch.randn(3, 8, 5), None,
                                                   None, 0.5, "tanh", False, True), r"activation"),
    ],
    ids=["weight2", "hidden-0", "bias1", "activation"],
)  # fmt: skip
def test_op_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# 3. the module, its conversions, DepthMuPNet and param_groups
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
    groups = {g["name"]: g for g in param_groups(net, lr=1.0)}
    stack = net.stack
    assert [id(p) for p in groups["stack.weight"]["params"]] == [id(stack.weight1), id(stack.weight2)]
    assert [id(p) for p in groups["stack.bias"]["params"]] == [id(stack.bias1), id(stack.bias2)]
    for name in ("stack.weight", "stack.bias"):  # no width scaling (base_width = width): the depth rule
        assert groups[name]["lr"] == pytest.approx(stack.parametrization.lr_scale(4, "adam"))
    with pytest.raises(TypeError, match="block"):
        DepthMuPNet(3, 16, 4, 2, hidden_width=40, block="pre")


# ---------------------------------------------------------------------------------------------------
# 4. torch.compile and torch.func on the module
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
# 5. empty batch
# ---------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize(("batch", "width"), [(3, 0), (0, 0), (0, 5)])
def test_empty_direct_ops_match_their_fake_rules(batch, width):
    """No rows or no stream features: the ops return empty tensors of the shapes their fake rules give
    (opcheck), and zero bias gradients."""
    weights = [torch.randn(2, 4, width), torch.randn(2, width, 4)]
    biases = [torch.randn(2, 4), torch.randn(2, width)]
    args = (torch.randn(batch, width), *weights, *biases, 0.5, "relu", True, True, 0)
    op, backward_op = torch.ops.dmup.residual_mlp_stack, torch.ops.dmup.residual_mlp_stack_backward
    torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
    _, saved, mask = op(*args)
    backward_args = (torch.randn(batch, width), saved, mask, *weights, *biases, 0.5, "relu", True, 0)
    torch.library.opcheck(backward_op.default, backward_args, test_utils=("test_schema", "test_faketensor"))
    grads = backward_op(*backward_args)
    assert grads[0].shape == (batch, width)
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads[3:])


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
