"""Triton kernels for CUDA tensors; on the CPU they run through the Triton interpreter.

The interpreter is chosen when the kernels are defined, so TRITON_INTERPRET=1 must be set before
dmup_kernels is imported.
"""

try:
    import triton

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRETED: bool = HAS_TRITON and bool(triton.knobs.runtime.interpret)
"""The kernels were defined under the Triton interpreter (they then run on CPU tensors)."""
