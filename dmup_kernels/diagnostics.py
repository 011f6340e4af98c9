"""Diagnostics of deep residual networks: the depth coord check, feature diversity along depth
(Depth-muP paper, Def. 7.6) and representation alignment between two feature matrices (Platonic
Representation Hypothesis, arXiv 2405.07987, App. A). Feature matrices have one row per sample, the
same samples in A and B.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    check_choice,
    check_finite_real,
    check_like,
    check_non_negative,
    check_positive_int,
    check_shape,
    check_tensor,
)
from .optim import param_groups
from .parametrization import OPTIMIZERS


@dataclass(frozen=True)
class FeatureDiversity:
    """``distance[i] = d(eps[i])`` and the fitted exponent ``kappa`` of ``d ~ eps^(1 - kappa)``."""

    eps: Tensor
    distance: Tensor
    kappa: float


def feature_diversity(
    stream: Sequence[Tensor] | Tensor, *, lam: float = 0.5, eps: Sequence[float] | None = None
) -> FeatureDiversity:
    """How fast the residual stream moves at relative depth ``lam`` (paper Def. 7.6).

    ``d(eps) = mean over samples of ||x^{floor((lam + eps) L)} - x^{floor(lam L)}|| / sqrt(n)`` for the
    states ``stream = [x^0, ..., x^L]`` (each (..., n)), and ``kappa = 1 - slope`` of the least-squares
    line through (log eps, log d). A Brownian path gives kappa = 1/2, a smooth path kappa = 0.

    Args:
        stream: the L + 1 states, as a sequence or a tensor stacked on dim 0.
        lam: the relative depth in [0, 1) around which the stream is probed.
        eps: relative depth increments, each in (0, 1 - lam]; default: 1/L, 2/L, 4/L, ... up to 1 - lam.
    """
    if not isinstance(stream, Tensor):
        states_list = list(stream)
        for index, state in enumerate(states_list):
            check_tensor(state, f"stream[{index}]")
            check_like(state, f"stream[{index}]", states_list[0], "stream[0]")
            check_shape(state, f"stream[{index}]", states_list[0].shape)
        stream = torch.stack(states_list) if states_list else torch.empty(0)
    states = check_tensor(stream, "stream")
    if states.dim() < 2 or states.shape[0] < 3:
        raise ValueError(f"stream must hold at least 3 states x^0..x^L of shape (..., n); got {tuple(states.shape)}")
    lam = check_finite_real(lam, "lam")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lam must be in [0, 1); got {lam}")
    depth = states.shape[0] - 1
    default_eps = eps is None
    if default_eps:
        eps = [2.0**k / depth for k in range(int(math.log2(depth)) + 1) if lam + 2.0**k / depth <= 1.0]
    eps_values = [check_finite_real(e, f"eps[{index}]") for index, e in enumerate(eps)]
    if any(not 0.0 < e <= 1.0 - lam for e in eps_values):
        raise ValueError(f"eps must hold values in (0, 1 - lam] = (0, {1.0 - lam}]; got {eps_values}")
    if len(set(eps_values)) < 2:  # kappa is the slope of a line through the points (log eps, log d)
        hint = (
            f" (the default for L = {depth} and lam = {lam}: give more states or a smaller lam)" if default_eps else ""
        )
        raise ValueError(f"eps must hold at least 2 distinct values; got {eps_values}{hint}")
    width = states.shape[-1]
    flat = states.reshape(depth + 1, -1, width).double()
    start = math.floor(lam * depth)
    distance = torch.stack(
        [(flat[math.floor((lam + e) * depth)] - flat[start]).norm(dim=-1).mean() / math.sqrt(width) for e in eps_values]
    )
    log_eps, log_d = torch.tensor(eps_values, dtype=torch.float64).log(), distance.log()
    slope = ((log_eps - log_eps.mean()) * (log_d - log_d.mean())).sum() / (log_eps - log_eps.mean()).square().sum()
    return FeatureDiversity(torch.tensor(eps_values, dtype=torch.float64), distance, 1.0 - float(slope))


def _features(a: Tensor, name: str) -> Tensor:
    check_tensor(a, name)
    if a.dim() != 2 or a.shape[0] < 2:
        raise ValueError(
            f"{name} must be a 2-D (samples, features) tensor with at least 2 samples; got {tuple(a.shape)}"
        )
    return a.double()


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = _features(a, "A"), _features(b, "B")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"A and B must have the same number of samples (rows); got {a.shape[0]} and {b.shape[0]}")
    return a, b


def _knn(features: Tensor, k: int) -> Tensor:
    """(N, N) boolean: j is among the k nearest neighbours of i by cosine similarity, i excluded."""
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.topk(k, dim=1).indices
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, neighbours, True)


def _check_k(k: int, samples: int) -> int:
    k = check_positive_int(k, "k")
    if k >= samples:
        raise ValueError(f"k must be smaller than the number of samples ({samples}); got {k}")
    return k


def mutual_knn(A: Tensor, B: Tensor, k: int = 10) -> float:
    """Mean over samples i of |kNN_A(i) & kNN_B(i)| / k, neighbours by cosine similarity (L2-normalised
    rows), each sample excluded from its own neighbours. 1 when A and B order neighbours alike."""
    a, b = _pair(A, B)
    k = _check_k(k, a.shape[0])
    return float((_knn(a, k) & _knn(b, k)).sum(dim=1).double().mean() / k)


def _centered_gram(features: Tensor) -> Tensor:
    """H K H for the linear kernel K = X X^T and the centring matrix H."""
    centered = features - features.mean(dim=0, keepdim=True)
    return centered @ centered.T


def _ratio(cross: Tensor, self_a: Tensor, self_b: Tensor) -> float:
    return float(cross / (self_a * self_b).sqrt())


def cka(A: Tensor, B: Tensor) -> float:
    """Linear CKA with the biased HSIC: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = A A^T, L = B B^T."""
    a, b = _pair(A, B)
    ka, kb = _centered_gram(a), _centered_gram(b)
    return _ratio((ka * kb).sum(), (ka * ka).sum(), (kb * kb).sum())


def _unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:
    """Song et al. (2012): [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), with
    K~, L~ the Gram matrices with zeroed diagonals."""
    n = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    ones = torch.ones(n, dtype=k.dtype)
    trace = (k * l).sum()
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return (trace + sums - cross) / (n * (n - 3))


def unbiased_cka(A: Tensor, B: Tensor) -> float:
    """Linear CKA with the unbiased HSIC estimator (needs at least 4 samples)."""
    a, b = _pair(A, B)
    if a.shape[0] < 4:
        raise ValueError(f"unbiased_cka needs at least 4 samples; got {a.shape[0]}")
    ka, kb = a @ a.T, b @ b.T
    return _ratio(_unbiased_hsic(ka, kb), _unbiased_hsic(ka, ka), _unbiased_hsic(kb, kb))


def _top_k(kernel: Tensor, k: int) -> Tensor:
    """(N, N) boolean: K_ij is among the k largest entries of row i of the kernel, j != i."""
    off_diagonal = kernel.clone().fill_diagonal_(-math.inf)
    return torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, off_diagonal.topk(k, dim=1).indices, True)


def cknna(A: Tensor, B: Tensor, k: int = 10) -> float:
    """CKNNA: Align(K, L) / sqrt(Align(K, K) Align(L, L)) with the linear kernels K = A A^T, L = B B^T and
    Align(K, L) = sum over i != j of a(i, j) (K_ij - mean_l K_il) (L_ij - mean_l L_il), where a(i, j) = 1
    when K_ij is among the k largest of row i of K and L_ij among the k largest of row i of L."""
    a, b = _pair(A, B)
    k = _check_k(k, a.shape[0])
    kernels = (a @ a.T, b @ b.T)
    tops = tuple(_top_k(kernel, k) for kernel in kernels)
    centered = tuple(kernel - kernel.mean(dim=1, keepdim=True) for kernel in kernels)

    def align(x: int, y: int) -> Tensor:
        return ((tops[x] & tops[y]).double() * centered[x] * centered[y]).sum()

    return _ratio(align(0, 1), align(0, 0), align(1, 1))


COORD_CHECK_PLACES: tuple[str, ...] = ("1/4", "1/2", "1", "output")
"""Where coord_check measures: the residual stream at relative depths 1/4, 1/2 and 1, and the output."""
COORD_CHECK_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 1.0)
"""The relative depths of the stream places of COORD_CHECK_PLACES, in order."""


def _loss(prediction: Tensor, target: Tensor) -> Tensor:
    if target.dtype.is_floating_point:
        return F.mse_loss(prediction, target)
    return F.cross_entropy(prediction, target)


def coord_check(
    make_model: Callable[..., nn.Module],
    depths: Sequence[int],
    data: tuple[Tensor, Tensor],
    *,
    widths: Sequence[int] | None = None,
    steps: int = 5,
    optimizer: str = "adam",
    lr: float,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Trains a fresh model for ``steps`` steps at each depth (and width) on the batch ``data`` and
    records, before each step, the mean |coordinate| of the residual stream at relative depths 1/4, 1/2
    and 1 and of the output, and its change since the previous step (mean |x_t - x_{t-1}|; NaN at step
    0). Under the default parametrization the values are flat in depth and width; without depth or width
    scaling they grow.

    Args:
        make_model: ``make_model(depth)``, or ``make_model(depth, width)`` when ``widths`` is given: a model
            with ``.input``, ``.stack`` (a ResidualStack) and ``.readout`` (or ``.output``), such as
            ``DepthMuPNet``; called with the RNG seeded by ``seed``, so every size starts alike.
        depths: the depths. widths: the widths, each trained at every depth (None: one width, the model's).
        data: (inputs, targets): integer targets train with cross-entropy, floating ones with MSE.
        optimizer: "adam" (torch.optim.Adam), "adamw" or "sgd", with ``param_groups(model, lr, optimizer)``.
    Returns:
        rows ``{"width", "depth", "step", "place", "mean_abs", "change"}`` ("width": the model's stack
        width); ``pandas.DataFrame(rows)`` tabulates them.
    """
    if not callable(make_model):
        raise TypeError(f"make_model must be a callable depth -> model; got {type(make_model).__name__}")
    for depth in depths:
        check_positive_int(depth, "depth")
    for width in widths or ():
        check_positive_int(width, "width")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"data must be a pair (inputs, targets); got {type(data).__name__}")
    inputs, targets = data
    check_tensor(inputs, "inputs")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor; got {type(targets).__name__}")
    if inputs.dim() < 1 or targets.dim() < 1 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must have the same number of samples (dim 0); got shapes {tuple(inputs.shape)} and "
            f"{tuple(targets.shape)}"
        )
    check_positive_int(steps, "steps")
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    check_non_negative(lr, "lr")
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    sizes = [(depth, ()) for depth in depths] if widths is None else [(d, (w,)) for w in widths for d in depths]
    rows: list[dict[str, Any]] = []
    for depth, width in sizes:
        torch.manual_seed(seed)
        model = make_model(depth, *width)
        missing = [name for name in ("input", "stack") if not hasattr(model, name)]
        if not hasattr(model, "readout") and not hasattr(model, "output"):
            missing.append("readout (or output)")
        if missing:
            raise TypeError(
                f"make_model must return a model with .input, .stack and .readout (or .output); "
                f"{type(model).__name__} has no {', '.join(missing)}"
            )
        readout = model.readout if hasattr(model, "readout") else model.output
        opt = optimizers[optimizer](param_groups(model, lr, optimizer))
        previous: dict[str, Tensor] = {}
        for step in range(steps):
            opt.zero_grad()
            out, states = model.stack(model.input(inputs), return_states=True)
            prediction = readout(out)
            probes = {
                place: states[round(fraction * depth)]
                for place, fraction in zip(COORD_CHECK_PLACES, COORD_CHECK_FRACTIONS)
            }
            probes["output"] = prediction.detach()
            for place, value in probes.items():
                change = (value - previous[place]).abs().mean().item() if place in previous else math.nan
                rows.append(
                    {
                        "width": model.stack.width,
                        "depth": depth,
                        "step": step,
                        "place": place,
                        "mean_abs": value.abs().mean().item(),
                        "change": change,
                    }
                )
            previous = probes
            _loss(prediction, targets).backward()
            opt.step()
    return rows


def plot_coord_check(table: Sequence[dict[str, Any]], path: str | Path, *, against: str = "depth") -> Path:
    """Writes a PNG of a coord_check table: one panel per step, mean |x| against log2 ``against`` ("depth"
    or "width"), one line per place (and per value of the other size where the table has several).
    Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_choice(against, "against", ("depth", "width"))
    other = "width" if against == "depth" else "depth"
    others = sorted({row[other] for row in table})
    steps = sorted({row["step"] for row in table})
    figure, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.0), squeeze=False, sharey=True)
    for axis, step in zip(axes[0], steps):
        for place in COORD_CHECK_PLACES:
            for value in others:
                points = sorted(
                    (row[against], row["mean_abs"])
                    for row in table
                    if row["step"] == step and row["place"] == place and row[other] == value
                )
                label = place if len(others) == 1 else f"{place}, {other} {value}"
                axis.plot([math.log2(x) for x, _ in points], [v for _, v in points], marker="o", label=label)
        axis.set_title(f"step {step}")
        axis.set_xlabel(f"log2 {against}")
        axis.set_yscale("log")
    axes[0][0].set_ylabel("mean |x|")
    axes[0][-1].legend(title="place", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
