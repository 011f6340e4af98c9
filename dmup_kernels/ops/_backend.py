"""Which implementation runs an op: the backend names and the rule behind "auto"."""

from __future__ import annotations

import torch

from .._checks import check_choice
from .._extension import HAS_CPP

BACKENDS: tuple[str, ...] = ("auto", "reference", "cpp")
""""auto" picks the fastest backend for the tensors' device; "reference" is eager PyTorch."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that runs on ``device`` for the requested ``backend``."""
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        return "cpp" if device.type == "cpu" and HAS_CPP else "reference"
    if backend == "cpp":
        if not HAS_CPP:
            raise RuntimeError("backend='cpp' needs the compiled extension dmup_kernels._C, which failed to import")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors; got tensors on {device}")
    return backend
