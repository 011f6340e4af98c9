"""What the examples share: the digits data (8x8 images, 10 classes, shipped with scikit-learn), the
paper's network (block "post", relu, mean subtraction, frozen input and output layers) and its training
loop with Adam and depth-scaled hidden learning rates."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import dmup_kernels as dk

PARAMETRIZATIONS: dict[str, dk.DepthParametrization] = {
    "Depth-muP (alpha=1/2, gamma=1/2)": dk.DEPTH_MUP,
    "standard (alpha=0, gamma=0)": dk.STANDARD,
    "alpha=1/2, gamma=0": dk.DepthParametrization(alpha=0.5, gamma=0.0),
}


def digits() -> tuple[Tensor, Tensor]:
    """All 1797 digits: inputs scaled to [0, 1] (64 features), integer labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)


def make_net(
    depth: int,
    parametrization: dk.DepthParametrization,
    width: int = 128,
    base_width: int | None = None,
    hidden_width: int | None = None,
) -> dk.DepthMuPNet:
    """DepthMuPNet with the input and output layers frozen, as in the paper's experiments (MLP blocks of
    hidden width ``hidden_width`` when given)."""
    net = dk.DepthMuPNet(
        64, width, depth, 10, parametrization=parametrization, base_width=base_width, hidden_width=hidden_width
    )
    for layer in (net.input, net.output):
        layer.requires_grad_(False)
    return net


def train(
    net: dk.DepthMuPNet, data: tuple[Tensor, Tensor], *, lr: float, steps: int, batch: int, seed: int
) -> list[float]:
    """Adam with param_groups (hidden lr scaled by depth) on minibatches drawn in an order fixed by
    ``seed``; returns the training loss of every step (inf once it diverges)."""
    inputs, targets = data
    optimizer = torch.optim.Adam(dk.param_groups(net, lr, "adam"))
    order = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(steps):
        index = torch.randint(0, inputs.shape[0], (batch,), generator=order)
        loss = F.cross_entropy(net(inputs[index]), targets[index])
        if not math.isfinite(loss.item()):
            return losses + [math.inf] * (steps - len(losses))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
