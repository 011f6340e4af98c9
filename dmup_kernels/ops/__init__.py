"""Functional ops, registered with torch.library under the namespace ``dmup``."""

from ._backend import BACKENDS, resolve_backend
from .residual_stack import residual_stack
from .scaled_residual import scaled_residual

__all__ = ["BACKENDS", "resolve_backend", "residual_stack", "scaled_residual"]
