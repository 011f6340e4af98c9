"""Loads the compiled extension dmup_kernels._C, which defines the torch.ops.dmup ops, and applies
``DMUP_CPU_ISA``.

Without the extension (not built, or built for another torch) the package still imports and every op
runs on the eager reference backend; one warning says so.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

try:
    from . import _C  # (loading the library registers torch.ops.dmup)

    HAS_CPP = True
except ImportError as error:  # pragma: no cover - exercised by a subprocess test
    _C = None
    HAS_CPP = False
    # Python words a missing module as a possible circular import; say plainly that it was never built.
    built = any((Path(__file__).parent / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    reason = str(error) if built else "not built"
    warnings.warn(
        f"dmup_kernels: C++ extension not available ({reason}); falling back to the reference backend",
        RuntimeWarning,
        stacklevel=2,
    )

if _C is not None and os.environ.get("DMUP_CPU_ISA"):
    # An unknown name (ValueError) or one this CPU cannot run (RuntimeError) stops the import.
    _C.pin_cpu_isa(os.environ["DMUP_CPU_ISA"])


def cpu_isa() -> str | None:
    """The instruction set the float32 CPU kernels run on: ``"avx512"``, ``"avx2"``, ``"neon"`` or
    ``"portable"`` (scalar code); ``None`` without the C++ extension.

    It is the best one this CPU runs, unless ``DMUP_CPU_ISA`` pinned another when the package was
    imported. float64 always runs the portable kernel, and under ``"avx512"`` a batch of at most 8 rows
    runs the 8-lane AVX2 kernels (16 lanes would be half empty).
    """
    return _C.cpu_isa() if _C is not None else None


def runnable_cpu_isas() -> tuple[str, ...]:
    """The instruction sets this CPU can run, best first (empty without the C++ extension)."""
    return _C.runnable_cpu_isas() if _C is not None else ()


@contextlib.contextmanager
def pinned_cpu_isa(name: str) -> Iterator[None]:
    """Runs the body with the float32 CPU kernels pinned to the instruction set ``name`` (for tests and
    benchmarks that compare instruction sets in one process), then restores the previous choice."""
    previous = _C.cpu_isa()
    _C.pin_cpu_isa(name)
    try:
        yield
    finally:
        _C.pin_cpu_isa(previous)
