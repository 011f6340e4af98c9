"""Benchmarks of dmup_kernels (docs/design.md §6): never part of the test suite, never asserted.

- ``cases.py``: the shapes (one ``Case`` per op/shape/mode) and their random inputs.
- ``variants.py``: the peers timed side by side (eager, torch.compile, each dmup backend).
- ``measure.py``: parity against the float64 reference, timing, saved-activation bytes, machine facts.
- ``run.py``: the runner, ``python -m benchmarks.run --help``.
- ``test_bench_ops.py``: pytest-benchmark tests,
  ``python -m pytest benchmarks --benchmark-only``.
"""
