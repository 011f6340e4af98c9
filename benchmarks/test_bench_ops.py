"""pytest-benchmark tests: one per (case, variant) on small shapes, each checking parity against the
float64 reference before it is timed. Not part of the test suite (pyproject's testpaths is tests/):

    python -m pytest benchmarks --benchmark-only

Cases come from ``cases.pytest_cases()``; variants, parity and the timed step are the runner's.
"""

from __future__ import annotations

import pytest

from .cases import Case, make_problem, pytest_cases
from .measure import first_call_with_parity, reference_results, step
from .variants import VARIANTS, Variant

DEVICE = "cpu"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("case", pytest_cases(), ids=lambda c: c.name)
def test_bench(benchmark, case: Case, variant: Variant) -> None:
    reason = variant.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    problem = make_problem(case)
    module = variant.build(case, problem.params, DEVICE)
    first_ms, inputs, parity = first_call_with_parity(module, problem, reference_results(problem), DEVICE)
    assert parity.ok, f"{variant.name} on {case.name}: {parity.describe()}"

    benchmark.group = case.name
    benchmark.extra_info.update(
        op=case.op, variant=variant.name, mode=case.mode, rel_err=parity.max_error, first_call_ms=first_ms
    )
    if case.flops is not None:
        benchmark.extra_info["gflop_per_call"] = case.flops / 1e9
    benchmark(step, module, inputs, case.mode)
