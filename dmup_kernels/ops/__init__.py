"""Functional ops, registered with torch.library under the namespace ``dmup``."""

from ..triton import HAS_TRITON
from ._backend import BACKENDS, resolve_backend
from .residual_mlp_stack import residual_mlp_stack
from .residual_stack import residual_stack
from .scaled_residual import scaled_residual

if HAS_TRITON:
    from ..triton import ops as triton_ops  # noqa: F401  (defines torch.ops.dmup.triton_*)

__all__ = ["BACKENDS", "resolve_backend", "residual_mlp_stack", "residual_stack", "scaled_residual"]
