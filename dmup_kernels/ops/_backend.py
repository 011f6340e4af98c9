"""Which implementation runs an op: the backend names and the rule behind "auto"."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._checks import check_choice
from .._extension import HAS_CPP
from ..triton import HAS_TRITON, INTERPRETED

BACKENDS: tuple[str, ...] = ("auto", "reference", "cpp", "cuda", "triton")
""""auto" picks the fastest backend for the tensors' device; "reference" is eager PyTorch, "cpp" the C++
CPU kernels, "cuda" the CUDA C++ kernels, "triton" the Triton kernels (CUDA tensors; CPU tensors only
under the Triton interpreter, TRITON_INTERPRET=1)."""

HAS_CUDA_KERNELS: bool = HAS_CPP and torch._C._dispatch_has_kernel_for_dispatch_key("dmup::scaled_residual", "CUDA")
"""True when the extension was built with its CUDA kernels (a CUDA build of torch and CUDA_HOME)."""

TRITON_MIN_CAPABILITY = (7, 0)
"""The oldest NVIDIA GPUs Triton compiles for (Volta), as torch.compile also requires."""


def _capability(device: torch.device) -> tuple[int, int]:
    properties = torch.cuda.get_device_properties(device)
    return properties.major, properties.minor


def resolve_backend(backend: str, device: torch.device, *, triton_fuses: Callable[[], bool] | None = None) -> str:
    """The concrete backend that runs on ``device`` for the requested ``backend``.

    "auto": the C++ kernels on CPU tensors. On CUDA tensors, Triton where its depth-fused kernels take the
    call (``triton_fuses()``; None: the op has none), else the CUDA C++ kernels, whose host loop launches
    from C++ where Triton's per-layer routes launch from Python (measured in docs/design.md §7.8), and
    Triton where those are not built; Triton only on GPUs it compiles for (``TRITON_MIN_CAPABILITY``);
    else the reference.
    """
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        if device.type == "cpu" and HAS_CPP:
            return "cpp"
        if device.type != "cuda":
            return "reference"
        triton = HAS_TRITON and _capability(device) >= TRITON_MIN_CAPABILITY
        if not (triton or HAS_CUDA_KERNELS):
            return "reference"
        fused = triton and triton_fuses is not None and triton_fuses()
        return "triton" if fused or not HAS_CUDA_KERNELS else "cuda"
    if backend == "cpp":
        if not HAS_CPP:
            raise RuntimeError("backend='cpp' needs the compiled extension dmup_kernels._C, which failed to import")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors; got tensors on {device}")
    if backend == "cuda":
        if not HAS_CUDA_KERNELS:
            raise RuntimeError("backend='cuda' needs dmup_kernels._C built with CUDA (a CUDA torch and CUDA_HOME)")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors; got tensors on {device}")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which failed to import")
        if device.type != "cuda" and not (device.type == "cpu" and INTERPRETED):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
                f"got tensors on {device}"
            )
        if device.type == "cuda" and (capability := _capability(device)) < TRITON_MIN_CAPABILITY:
            oldest, found = (".".join(map(str, c)) for c in (TRITON_MIN_CAPABILITY, capability))
            raise ValueError(
                f"backend='triton' needs a GPU of compute capability {oldest} or newer, the oldest Triton compiles "
                f"for; {torch.cuda.get_device_name(device)} has {found}: use backend='cuda' or 'auto'"
            )
    return backend
