"""Benchmarks of dmup_kernels (docs/design.md §6): never part of the test suite, never asserted.

- ``cases.py``: the shapes (one ``Case`` per op/shape/mode) and their random inputs.
- ``variants.py``: the peers timed side by side (eager, torch.compile, each dmup backend), and those of
  the checkpoint sweep.
- ``measure.py``: parity against the float64 reference, timing, saved-activation bytes, process memory,
  machine facts.
- ``run.py``: the runner, ``python -m benchmarks.run --help``.
- ``checkpoint_sweep.py``: time and peak memory of deep stacks with and without depth checkpointing,
  ``python -m benchmarks.checkpoint_sweep --help``.
- ``test_bench_ops.py``: pytest-benchmark tests,
  ``python -m pytest benchmarks --benchmark-only``.
"""
