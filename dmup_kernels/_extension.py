"""Loads the compiled extension dmup_kernels._C, which defines the torch.ops.dmup ops.

Without it (not built, or built for another torch) the package still imports and every op runs on
the eager reference backend; one warning says so.
"""

import warnings

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.dmup)

    HAS_CPP = True
except ImportError as error:  # pragma: no cover - exercised by a subprocess test
    HAS_CPP = False
    warnings.warn(
        f"dmup_kernels: C++ extension not available ({error}); falling back to the reference backend",
        RuntimeWarning,
        stacklevel=2,
    )
