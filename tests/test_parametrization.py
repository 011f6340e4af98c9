"""Depth parametrization (docs/design.md §1.2-1.3): branch scale, learning-rate and epsilon scale formulas, presets,
validation."""

from __future__ import annotations

import dataclasses
import math

import pytest

import dmup_kernels
from dmup_kernels import COMPLETE_P, DEPTH_MUP, STANDARD, DepthParametrization

PARAMETRIZATIONS = [
    (0.5, 0.5, 1.0, 1),
    (1.0, 0.0, 1.0, 1),
    (0.0, 0.0, 1.0, 1),
    (0.5, 0.5, 2.5, 8),
    (0.75, 0.25, 0.3, 3),
    (1.0, 1.5, -1.0, 16),
    (2.0, 0.0, 1.0, 2),
]
DEPTHS = [1, 2, 3, 8, 17, 256, 1024, 4096]


def power(base: float, exponent: float) -> float:
    """base ** exponent through exp/log (base > 0), independent of the ** used by the code."""
    return math.exp(exponent * math.log(base))


@pytest.mark.parametrize("alpha,gamma,multiplier,base_depth", PARAMETRIZATIONS)
def test_branch_scale_formula(alpha, gamma, multiplier, base_depth):
    p = DepthParametrization(alpha, gamma, multiplier, base_depth)
    for depth in DEPTHS:
        expected = multiplier * power(depth / base_depth, -alpha)
        assert p.branch_scale(depth) == pytest.approx(expected, rel=1e-12), depth
    assert p.branch_scale(base_depth) == pytest.approx(multiplier, rel=1e-15)


@pytest.mark.parametrize("alpha,gamma,multiplier,base_depth", PARAMETRIZATIONS)
def test_lr_scale_formula(alpha, gamma, multiplier, base_depth):
    p = DepthParametrization(alpha, gamma, multiplier, base_depth)
    for depth in DEPTHS:
        relative = depth / base_depth
        assert p.lr_scale(depth, "adam") == pytest.approx(power(relative, -gamma), rel=1e-12), depth
        assert p.lr_scale(depth, "sgd") == pytest.approx(power(relative, alpha - gamma), rel=1e-12), depth
        assert p.lr_scale(depth) == p.lr_scale(depth, "adam")  # adam is the default
        assert p.lr_scale(depth, "adamw") == p.lr_scale(depth, "adam")
        assert p.eps_scale(depth) == pytest.approx(power(relative, -alpha), rel=1e-12), depth
    # independent of the multiplier: the multiplier only scales the branch
    other = DepthParametrization(alpha, gamma, 7.0, base_depth)
    assert other.lr_scale(17, "sgd") == p.lr_scale(17, "sgd")


@pytest.mark.parametrize("depth", DEPTHS)
def test_depth_mup_rules(depth):
    """Depth-muP: branch 1/sqrt(L); Adam lr / sqrt(L); SGD lr unchanged (docs/design.md §1.1, §1.2)."""
    assert DEPTH_MUP.branch_scale(depth) == pytest.approx(1 / math.sqrt(depth), rel=1e-12)
    assert DEPTH_MUP.lr_scale(depth, "adam") == pytest.approx(1 / math.sqrt(depth), rel=1e-12)
    assert DEPTH_MUP.lr_scale(depth, "sgd") == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("depth", DEPTHS)
def test_complete_p_and_standard_rules(depth):
    assert COMPLETE_P.branch_scale(depth) == pytest.approx(1 / depth, rel=1e-12)
    assert COMPLETE_P.lr_scale(depth, "adam") == pytest.approx(1.0, rel=1e-12)
    assert COMPLETE_P.lr_scale(depth, "sgd") == pytest.approx(depth, rel=1e-12)
    assert STANDARD.branch_scale(depth) == 1.0
    assert STANDARD.lr_scale(depth, "adam") == 1.0
    assert STANDARD.lr_scale(depth, "sgd") == 1.0


def test_presets():
    assert (DEPTH_MUP.alpha, DEPTH_MUP.gamma) == (0.5, 0.5)
    assert (COMPLETE_P.alpha, COMPLETE_P.gamma) == (1.0, 0.0)
    assert (STANDARD.alpha, STANDARD.gamma) == (0.0, 0.0)
    for preset in (DEPTH_MUP, COMPLETE_P, STANDARD):
        assert isinstance(preset, DepthParametrization)
        assert preset.multiplier == 1.0 and preset.base_depth == 1
    assert dmup_kernels.parametrization.DEPTH_MUP is DEPTH_MUP


def test_defaults_and_equality():
    p = DepthParametrization(0.5, 0.5)
    assert p.multiplier == 1.0 and p.base_depth == 1
    assert p == DEPTH_MUP
    assert DepthParametrization(0.5, 0.5, base_depth=8) != DEPTH_MUP
    assert hash(p) == hash(DEPTH_MUP)


def test_frozen():
    p = DepthParametrization(0.5, 0.5, 2.0, 8)
    for field in ("alpha", "gamma", "multiplier", "base_depth"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, field, 1)
    assert (p.alpha, p.gamma, p.multiplier, p.base_depth) == (0.5, 0.5, 2.0, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEPTH_MUP.alpha = 1.0
    assert DEPTH_MUP.alpha == 0.5


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(alpha=-0.5, gamma=0.5), ValueError, r"alpha.*>= 0"),
        (dict(alpha=-1e-9, gamma=0.0), ValueError, r"alpha"),
        (dict(alpha=0.5, gamma=0.5, base_depth=0), ValueError, r"base_depth.*>= 1"),
        (dict(alpha=0.5, gamma=0.5, base_depth=-4), ValueError, r"base_depth"),
        (dict(alpha=0.5, gamma=0.5, base_depth=2.0), TypeError, r"base_depth"),
        (dict(alpha=0.5, gamma=0.5, multiplier=math.inf), ValueError, r"multiplier.*finite"),
        (dict(alpha=0.5, gamma=0.5, multiplier=-math.inf), ValueError, r"multiplier"),
        (dict(alpha=0.5, gamma=0.5, multiplier=math.nan), ValueError, r"multiplier.*finite"),
        (dict(alpha=math.nan, gamma=0.5), ValueError, r"alpha"),
        (dict(alpha=0.5, gamma=math.inf), ValueError, r"gamma"),
        (dict(alpha="0.5", gamma=0.5), TypeError, r"alpha"),
        (dict(alpha=0.5, gamma=0.5, multiplier="a"), TypeError, r"multiplier"),
    ],
)
def test_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        DepthParametrization(**kwargs)


@pytest.mark.parametrize("depth,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_depth(depth, error):
    for call in (DEPTH_MUP.branch_scale, DEPTH_MUP.lr_scale, lambda d: DEPTH_MUP.lr_scale(d, "sgd")):
        with pytest.raises(error, match="depth"):
            call(depth)


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match=r"optimizer.*'adagrad'"):
        DEPTH_MUP.lr_scale(4, "adagrad")
