"""The checkpoint sweep's pieces that decide what it runs and what it measures (benchmarks/checkpoint_sweep.py):
its cases, the memory estimate that keeps too-deep points from running, and the eager checkpointed stack
it times against the eager stack. Timings are never asserted."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.cases import CHECKPOINT_SWEEP_DEPTHS, checkpoint_sweep_cases
from benchmarks.checkpoint_sweep import extrapolate_peak, parse_args


def test_sweep_cases_follow_max_depth() -> None:
    assert CHECKPOINT_SWEEP_DEPTHS == (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    assert [case.depth for case in checkpoint_sweep_cases()] == list(CHECKPOINT_SWEEP_DEPTHS)
    args = parse_args(["--max-depth", "3000"])
    cases = checkpoint_sweep_cases(args.max_depth)
    assert [case.depth for case in cases] == [1024, 2048]
    for case in cases:
        assert (case.op, case.width, case.batch, case.mode) == ("residual_stack", 128, 1024, "fwd+bwd")
        assert (case.activation, case.block, case.mean_subtract, case.bias) == ("relu", "post", True, False)
        assert case.dtype == torch.float32
        assert case.scale == pytest.approx(1 / math.sqrt(case.depth))
    with pytest.raises(SystemExit):
        parse_args(["--max-depth", "512"])  # no depth of the sweep left


def test_memory_estimate_extrapolates_the_two_deepest_points() -> None:
    def linear(depth: int) -> int:
        return 300 * 2**20 + 600 * 2**10 * depth

    assert extrapolate_peak({64: linear(64)}, 1024) is None
    # the shallowest point is off the line (fixed costs that stop growing): only the two deepest count
    measured = {16: 7, 256: linear(256), 1024: linear(1024)}
    assert extrapolate_peak(measured, 65536) == linear(65536)


def test_memory_estimate_errs_high_for_checkpointing() -> None:
    """Checkpointing keeps the weights and about 2*sqrt(L) layers of states: a concave growth, which the
    line through two shallower depths overestimates, so a point that the estimate lets run fits."""

    def checkpointed(depth: int) -> int:
        return round(300 * 2**20 + 192 * 2**10 * depth + 2 * math.sqrt(depth) * 528 * 2**10)

    for shallow, deep, target in ((64, 256, 1024), (1024, 2048, 65536)):
        estimate = extrapolate_peak({shallow: checkpointed(shallow), deep: checkpointed(deep)}, target)
        assert checkpointed(target) <= estimate <= 1.2 * checkpointed(target)
