"""dmup_kernels.reference against independent float64 formulas written here with numpy (docs/design.md §2.2-§2.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmup_kernels import reference

from conftest import make_generator, rel_err
from sample_inputs import ACTIVATIONS, random_tensor

TOL = 1e-13

# ---------------------------------------------------------------------------------------------------
# independent formulas (numpy, float64)
# ---------------------------------------------------------------------------------------------------


def np_phi(name: str, h: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.where(h > 0, h, 0.0)
    if name == "abs":
        return np.where(h < 0, -h, h)
    if name == "gelu":
        return 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))
    if name == "silu":
        return h / (1.0 + np.exp(-h))
    if name == "identity":
        return h.copy()
    raise AssertionError(name)


def np_dphi(name: str, h: np.ndarray) -> np.ndarray:
    """phi'(h), derived by hand."""
    if name == "relu":
        return (h > 0).astype(np.float64)
    if name == "abs":
        return np.sign(h)
    if name == "gelu":
        k, c = np.sqrt(2.0 / np.pi), 0.044715
        t = np.tanh(k * (h + c * h**3))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * k * (1.0 + 3.0 * c * h * h)
    if name == "silu":
        sig = 1.0 / (1.0 + np.exp(-h))
        return sig * (1.0 + h * (1.0 - sig))
    if name == "identity":
        return np.ones_like(h)
    raise AssertionError(name)


def np_mean_subtract(u: np.ndarray) -> np.ndarray:
    """u minus its mean over the last dim, with an explicit loop over rows and math.fsum."""
    rows = u.reshape(-1, u.shape[-1])
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        mean = math.fsum(rows[r].tolist()) / rows.shape[1]
        out[r] = rows[r] - mean
    return out.reshape(u.shape)


def np_scaled_residual(x, b, scale, activation, mean_subtract):
    v = np_phi(activation, b)
    if mean_subtract:
        v = np_mean_subtract(v)
    return x + scale * v


def np_linear(x, w, bias=None):
    h = np.einsum("...j,ij->...i", x, w)
    return h if bias is None else h + bias


def np_post_block(x, w, bias, scale, activation, mean_subtract):
    return np_scaled_residual(x, np_linear(x, w, bias), scale, activation, mean_subtract)


def np_pre_block(x, w, bias, scale, activation, mean_subtract):
    h = np_linear(np_phi(activation, x), w, bias)
    if mean_subtract:
        h = np_mean_subtract(h)
    return x + scale * h


def np_mlp_block(x, w1, w2, scale, activation, b1=None, b2=None, mean_subtract=False):
    h = np_linear(np_phi(activation, np_linear(x, w1, b1)), w2, b2)
    if mean_subtract:
        h = np_mean_subtract(h)
    return x + scale * h


def rand(shape, seed, scale=1.0):
    return scale * random_tensor(tuple(shape), torch.float64, make_generator(seed))


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------


def test_activation_names():
    assert set(reference.ACTIVATIONS) == set(ACTIVATIONS)
    assert set(reference.BLOCKS) == {"post", "pre"}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_matches_formula(activation, seed):
    h = rand((7, 33), seed, scale=3.0)
    got = reference.activation(h, activation)
    assert got.dtype == torch.float64
    assert rel_err(got, torch.from_numpy(np_phi(activation, t2n(h)))) < TOL


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_scalar_points(activation):
    """A few points evaluated with scalar math, element by element."""
    points = [-3.0, -1.0, -0.25, 0.5, 1.0, 2.5]
    k = math.sqrt(2.0 / math.pi)
    expected = {
        "relu": [max(p, 0.0) for p in points],
        "abs": [abs(p) for p in points],
        "gelu": [0.5 * p * (1.0 + math.tanh(k * (p + 0.044715 * p**3))) for p in points],
        "silu": [p / (1.0 + math.exp(-p)) for p in points],
        "identity": points,
    }[activation]
    got = reference.activation(torch.tensor(points, dtype=torch.float64), activation)
    assert got.tolist() == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_subtract_mean(seed):
    u = rand((4, 3, 17), seed)
    got = reference.subtract_mean(u)
    assert rel_err(got, torch.from_numpy(np_mean_subtract(t2n(u)))) < TOL
    assert got.sum(dim=-1).abs().max().item() < 1e-13


@pytest.mark.parametrize("mean_subtract", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 7), (1, 1), (96,)])
def test_scaled_residual(shape, activation, mean_subtract, seed):
    x, b = rand(shape, seed), rand(shape, seed + 1)
    got = reference.scaled_residual(x, b, 0.37, activation, mean_subtract)
    expected = np_scaled_residual(t2n(x), t2n(b), 0.37, activation, mean_subtract)
    assert rel_err(got, torch.from_numpy(expected)) < TOL


def test_scaled_residual_defaults(seed):
    """Defaults: identity activation, no mean subtraction."""
    x, b = rand((3, 8), seed), rand((3, 8), seed + 1)
    assert rel_err(reference.scaled_residual(x, b, 0.5), x + 0.5 * b) < TOL


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mean_subtract", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_post_block(activation, mean_subtract, bias, seed):
    n = 48
    x, w = rand((2, 5, n), seed), rand((n, n), seed + 1, 1 / math.sqrt(n))
    b = rand((n,), seed + 2) if bias else None
    got = reference.post_block(x, w, b, scale=0.3, activation=activation, mean_subtract=mean_subtract)
    expected = np_post_block(t2n(x), t2n(w), None if b is None else t2n(b), 0.3, activation, mean_subtract)
    assert rel_err(got, torch.from_numpy(expected)) < TOL


def test_post_block_defaults(seed):
    """post_block defaults: relu with mean subtraction."""
    x, w = rand((4, 9), seed), rand((9, 9), seed + 1)
    got = reference.post_block(x, w, scale=0.5)
    assert rel_err(got, torch.from_numpy(np_post_block(t2n(x), t2n(w), None, 0.5, "relu", True))) < TOL


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mean_subtract", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_pre_block(activation, mean_subtract, bias, seed):
    n = 20
    x, w = rand((6, n), seed), rand((n, n), seed + 1, 1 / math.sqrt(n))
    b = rand((n,), seed + 2) if bias else None
    got = reference.pre_block(x, w, b, scale=0.7, activation=activation, mean_subtract=mean_subtract)
    expected = np_pre_block(t2n(x), t2n(w), None if b is None else t2n(b), 0.7, activation, mean_subtract)
    assert rel_err(got, torch.from_numpy(expected)) < TOL


def test_pre_block_defaults(seed):
    """pre_block defaults: relu, no mean subtraction."""
    x, w = rand((4, 9), seed), rand((9, 9), seed + 1)
    got = reference.pre_block(x, w, scale=0.5)
    assert rel_err(got, torch.from_numpy(np_pre_block(t2n(x), t2n(w), None, 0.5, "relu", False))) < TOL


@pytest.mark.parametrize("mean_subtract", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_block(activation, bias, mean_subtract, seed):
    n, m = 12, 31
    x = rand((3, 4, n), seed)
    w1, w2 = rand((m, n), seed + 1, 1 / math.sqrt(n)), rand((n, m), seed + 2, 1 / math.sqrt(m))
    b1, b2 = (rand((m,), seed + 3, 0.1), rand((n,), seed + 4, 0.1)) if bias else (None, None)
    got = reference.mlp_block(x, w1, w2, b1, b2, scale=0.25, activation=activation, mean_subtract=mean_subtract)
    assert got.shape == x.shape
    biases = (None, None) if b1 is None else (t2n(b1), t2n(b2))
    expected = np_mlp_block(t2n(x), t2n(w1), t2n(w2), 0.25, activation, *biases, mean_subtract)
    assert rel_err(got, torch.from_numpy(expected)) < TOL


def test_mlp_block_defaults(seed):
    """mlp_block defaults: relu, no biases, no mean subtraction."""
    x, w1, w2 = rand((4, 9), seed), rand((5, 9), seed + 1), rand((9, 5), seed + 2)
    got = reference.mlp_block(x, w1, w2, scale=0.5)
    assert rel_err(got, torch.from_numpy(np_mlp_block(t2n(x), t2n(w1), t2n(w2), 0.5, "relu"))) < TOL


@pytest.mark.parametrize(
    "depth,activation,mean_subtract,bias",
    [(1, "relu", False, False), (3, "abs", True, True), (17, "gelu", False, True)],
)
def test_residual_mlp_stack(depth, activation, mean_subtract, bias, seed):
    n, m = 10, 23
    x = rand((5, n), seed)
    w1, w2 = rand((depth, m, n), seed + 1, 1 / math.sqrt(n)), rand((depth, n, m), seed + 2, 1 / math.sqrt(m))
    b1, b2 = (rand((depth, m), seed + 3, 0.1), rand((depth, n), seed + 4, 0.1)) if bias else (None, None)
    scale = 1 / math.sqrt(depth)
    kwargs = dict(scale=scale, activation=activation, mean_subtract=mean_subtract)
    got = reference.residual_mlp_stack(x, w1, w2, b1, b2, **kwargs)
    states = reference.residual_mlp_stream(x, w1, w2, b1, b2, **kwargs)
    assert len(states) == depth + 1 and states[0] is x and torch.equal(states[-1], got)
    expected = t2n(x)
    for l in range(depth):
        biases = (None, None) if b1 is None else (t2n(b1[l]), t2n(b2[l]))
        expected = np_mlp_block(expected, t2n(w1[l]), t2n(w2[l]), scale, activation, *biases, mean_subtract)
    assert rel_err(got, torch.from_numpy(expected)) < 1e-12


@pytest.mark.parametrize("mean_subtract", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_block_backward_matches_spec(activation, mean_subtract, seed):
    """The reference's autograd gradients equal the hand-written backward of docs/design.md §2.5."""
    n, m, scale = 9, 14, 0.6
    x = rand((2, 3, n), seed).requires_grad_()
    w1 = rand((m, n), seed + 1, 1 / math.sqrt(n)).requires_grad_()
    w2 = rand((n, m), seed + 2, 1 / math.sqrt(m)).requires_grad_()
    b1, b2 = rand((m,), seed + 3).requires_grad_(), rand((n,), seed + 4).requires_grad_()
    g = rand((2, 3, n), seed + 5)
    reference.mlp_block(x, w1, w2, b1, b2, scale=scale, activation=activation, mean_subtract=mean_subtract).backward(g)

    xn, w1n, w2n, gn = t2n(x).reshape(-1, n), t2n(w1), t2n(w2), t2n(g).reshape(-1, n)
    h1 = xn @ w1n.T + t2n(b1)
    a = np_phi(activation, h1)
    dh2 = np_mean_subtract(scale * gn) if mean_subtract else scale * gn
    dh1 = (dh2 @ w2n) * np_dphi(activation, h1)
    expected = {
        "x": gn + dh1 @ w1n, "weight1": dh1.T @ xn, "weight2": dh2.T @ a, "bias1": dh1.sum(0), "bias2": dh2.sum(0)
    }  # fmt: skip
    for name, tensor in zip(expected, (x, w1, w2, b1, b2)):
        got = tensor.grad.reshape(-1, n) if name == "x" else tensor.grad
        assert rel_err(got, torch.from_numpy(expected[name])) < 1e-12, name


@pytest.mark.parametrize(
    "depth,block,activation,mean_subtract,bias",
    [
        (1, "post", "relu", True, False),
        (2, "pre", "abs", False, True),
        (17, "post", "gelu", True, True),
        (17, "pre", "silu", True, False),
        (5, "post", "identity", False, True),
        (5, "pre", "identity", True, True),
    ],
)
def test_residual_stack(depth, block, activation, mean_subtract, bias, seed):
    n = 24
    x = rand((5, n), seed)
    w = rand((depth, n, n), seed + 1, 1 / math.sqrt(n))
    b = rand((depth, n), seed + 2, 0.1) if bias else None
    scale = 1 / math.sqrt(depth)
    got = reference.residual_stack(
        x, w, b, scale=scale, activation=activation, block=block, mean_subtract=mean_subtract
    )
    layer = np_post_block if block == "post" else np_pre_block
    expected = t2n(x)
    for index in range(depth):
        expected = layer(
            expected, t2n(w[index]), None if b is None else t2n(b[index]), scale, activation, mean_subtract
        )
    assert rel_err(got, torch.from_numpy(expected)) < 1e-12


def test_residual_stack_defaults(seed):
    """residual_stack defaults: post block, relu, mean subtraction."""
    n = 10
    x, w = rand((3, n), seed), rand((3, n, n), seed + 1, 1 / math.sqrt(n))
    got = reference.residual_stack(x, w, scale=0.5)
    expected = t2n(x)
    for index in range(3):
        expected = np_post_block(expected, t2n(w[index]), None, 0.5, "relu", True)
    assert rel_err(got, torch.from_numpy(expected)) < 1e-12


@pytest.mark.parametrize("mean_subtract", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_post_block_backward_matches_spec(activation, mean_subtract, seed):
    """The reference's autograd gradients equal the hand-written backward of docs/design.md §2.3."""
    n, scale = 16, 0.6
    x = rand((2, 3, n), seed).requires_grad_()
    w = rand((n, n), seed + 1, 1 / math.sqrt(n)).requires_grad_()
    b = rand((n,), seed + 2).requires_grad_()
    g = rand((2, 3, n), seed + 3)
    reference.post_block(x, w, b, scale=scale, activation=activation, mean_subtract=mean_subtract).backward(g)

    xn, wn, gn = t2n(x).reshape(-1, n), t2n(w), t2n(g).reshape(-1, n)
    h = xn @ wn.T + t2n(b)
    dv = scale * gn
    du = np_mean_subtract(dv) if mean_subtract else dv
    dh = du * np_dphi(activation, h)
    assert rel_err(x.grad.reshape(-1, n), torch.from_numpy(gn + dh @ wn)) < 1e-12
    assert rel_err(w.grad, torch.from_numpy(dh.T @ xn)) < 1e-12
    assert rel_err(b.grad, torch.from_numpy(dh.sum(axis=0))) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_keeps_dtype(dtype, seed):
    x = rand((3, 8), seed).to(dtype)
    w = rand((2, 8, 8), seed + 1).to(dtype)
    assert reference.residual_stack(x, w, scale=0.5).dtype == dtype
    assert reference.scaled_residual(x, x, 0.5, "gelu", True).dtype == dtype
