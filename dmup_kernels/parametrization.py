"""Depth parametrizations (docs/design.md §1.2): how the branch multiplier and the hidden learning rate
scale with the depth L of a residual stack.

    branch_scale(L)      = multiplier * (L / base_depth) ** -alpha
    lr_scale(L, "adam")  = (L / base_depth) ** -gamma            (also "adamw")
    lr_scale(L, "sgd")   = (L / base_depth) ** (alpha - gamma)
    eps_scale(L)         = (L / base_depth) ** -alpha            (Adam's epsilon of the hidden parameters)

The width rules (muP) sit beside these in dmup_kernels.optim.param_groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ._checks import check_finite_real, check_positive_int, is_finite

Optimizer = Literal["adam", "adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
"""Adam with coupled L2 weight decay (torch.optim.Adam), AdamW (decoupled), and SGD."""


@dataclass(frozen=True)
class DepthParametrization:
    """Scaling rules for a residual stack of depth L.

    Args:
        alpha: branch exponent; each residual branch is multiplied by
            ``multiplier * (L / base_depth) ** -alpha``. Must be >= 0.
        gamma: learning-rate exponent of the hidden (residual) weights for Adam-like optimizers:
            ``lr * (L / base_depth) ** -gamma``; for SGD the exponent is ``alpha - gamma``.
        multiplier: the transferable constant ``a`` of the branch multiplier. Must be finite.
        base_depth: the depth at which the scales are exactly ``multiplier`` and 1. Must be >= 1.
    """

    alpha: float
    gamma: float
    multiplier: float = 1.0
    base_depth: int = 1

    def __post_init__(self) -> None:
        for name in ("alpha", "gamma", "multiplier"):
            check_finite_real(getattr(self, name), name)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0; got {self.alpha}")
        object.__setattr__(self, "base_depth", check_positive_int(self.base_depth, "base_depth"))  # frozen

    def _scaled_power(self, what: str, depth: int, exponent: float, factor: float = 1.0) -> float:
        """``factor * (depth / base_depth) ** exponent``; a ValueError naming ``what`` if it is not finite."""
        depth = check_positive_int(depth, "depth")
        try:
            value = factor * (depth / self.base_depth) ** exponent
        except OverflowError:  # past the float range: the depth ratio, or its power
            value = math.inf
        if not is_finite(value):
            raise ValueError(
                f"{what} at depth {depth} is not finite: {factor} * ({depth} / {self.base_depth}) ** {exponent}"
            )
        return value

    def branch_scale(self, depth: int) -> float:
        """``multiplier * (depth / base_depth) ** -alpha``: the factor on every residual branch."""
        return self._scaled_power("branch_scale", depth, -self.alpha, self.multiplier)

    def lr_scale(self, depth: int, optimizer: Optimizer = "adam") -> float:
        """Factor on the learning rate of the hidden weights of a stack of this depth.

        ``(depth / base_depth) ** -gamma`` for "adam" and "adamw" (any Adam-like optimizer) and
        ``(depth / base_depth) ** (alpha - gamma)`` for "sgd".
        """
        if optimizer in ("adam", "adamw"):
            exponent = -self.gamma
        elif optimizer == "sgd":
            exponent = self.alpha - self.gamma
        else:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
        return self._scaled_power("lr_scale", depth, exponent)

    def eps_scale(self, depth: int) -> float:
        """``(depth / base_depth) ** -alpha``: the factor on Adam's epsilon for the hidden parameters,
        whose gradients shrink like the branch multiplier (CompleteP's rule)."""
        return self._scaled_power("eps_scale", depth, -self.alpha)


DEPTH_MUP = DepthParametrization(alpha=0.5, gamma=0.5)
"""Depth-muP (Yang et al. 2023): branches scaled by 1/sqrt(L), Adam learning rate by 1/sqrt(L)."""

COMPLETE_P = DepthParametrization(alpha=1.0, gamma=0.0)
"""CompleteP (Dey et al. 2025): branches scaled by 1/L, learning rate unscaled for Adam."""

STANDARD = DepthParametrization(alpha=0.0, gamma=0.0)
"""No depth scaling: the usual residual network."""
