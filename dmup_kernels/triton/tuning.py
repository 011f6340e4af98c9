"""Launch configurations: autotuning on GPUs, one pinned config per shape otherwise.

Autotuning is keyed on the width, a bucket of the row count and the tensor dtypes. It is off under
the Triton interpreter (there, ``triton.autotune`` over several configs fails with "0 active drivers")
and when DMUP_AUTOTUNE=0; the kernels then launch with ``pinned(...)``, a safe default per shape.
Both settings are read once, when dmup_kernels is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import triton
from torch.library import wrap_triton

from . import INTERPRETED

AUTOTUNE: bool = os.environ.get("DMUP_AUTOTUNE", "1") != "0" and not INTERPRETED


def tuned(configs: list[triton.Config], key: list[str], prune: Callable | None = None) -> Callable:
    """Decorator: the kernel autotuned over ``configs`` when AUTOTUNE, else the kernel itself.

    ``prune(configs, named_args)`` drops the configs that do not fit a shape (e.g. too many registers).
    """

    def wrap(kernel):
        if not AUTOTUNE:
            return kernel
        # Triton passes the positional arguments and the keyword ones (the constexprs) apart.
        early_prune = (
            None
            if prune is None
            else {"early_config_prune": lambda configs, args, **kwargs: prune(configs, {**args, **kwargs})}
        )
        return triton.autotune(configs, key=key, prune_configs_by=early_prune)(kernel)

    return wrap


def launch(kernel, grid: Callable, pinned: triton.Config, *args, **kwargs) -> None:
    """Launches ``kernel`` through ``wrap_triton`` (so torch.compile can trace it), with the pinned config
    when not autotuning, on the device of its first tensor argument and that device's current stream.

    Triton launches (and autotunes) on the *current* CUDA device: without the guard, tensors on cuda:1
    while cuda:0 is current would run on the wrong device and stream. Every Triton op launches through
    here, and their other allocations name the tensors' device, so the guard covers the op bodies. CPU
    tensors under the interpreter need none."""
    if not AUTOTUNE:
        kwargs = {**kwargs, **pinned.kwargs, "num_warps": pinned.num_warps, "num_stages": pinned.num_stages}
    device = next(value.device for value in args if isinstance(value, torch.Tensor))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        wrap_triton(kernel)[grid](*args, **kwargs)


SHARED_MEMORY_BUDGET = 96 * 1024
"""Shared memory a config may use: what sm_86/sm_89 allow a block (99 KiB), below sm_80's and sm_90's."""

REGISTER_BYTES_PER_THREAD = 64
"""Pinned configs give each thread at most this many bytes of one (rows x width) register tile; a kernel
holds two or three such tiles. More spills registers (checked with tests/triton_aot.py for sm_80/90)."""


def _register_bytes(elements: int, itemsize: int) -> int:
    """Bytes of a register tile of tensors of ``itemsize``: the kernels hold half-precision values as float32."""
    return elements * max(itemsize, 4)


def warps_for_tile(elements: int, itemsize: int) -> int:
    """Warps (4 to 16) that keep a tile of ``elements`` within REGISTER_BYTES_PER_THREAD per thread."""
    threads = -(-_register_bytes(elements, itemsize) // REGISTER_BYTES_PER_THREAD)
    return min(16, max(4, triton.next_power_of_2(-(-threads // 32))))


def fits_registers(config: triton.Config, tile_elements: int, itemsize: int) -> bool:
    """An autotuning candidate may use up to twice the pinned budget per thread."""
    return _register_bytes(tile_elements, itemsize) <= 2 * REGISTER_BYTES_PER_THREAD * 32 * config.num_warps


def itemsize_of(args: dict) -> int:
    """The element size of the first tensor among a kernel's arguments."""
    return next(value.element_size() for value in args.values() if isinstance(value, torch.Tensor))


def rows_bucket(rows: int) -> int:
    """The autotuning bucket of a row count: the next power of two, at most 2^16."""
    return min(triton.next_power_of_2(max(rows, 1)), 1 << 16)


def float32_matmuls_use_tf32() -> bool:
    """Whether torch lets float32 CUDA matmuls use TF32: ``torch.backends.cuda.matmul.fp32_precision`` is
    "tf32", set directly, by ``allow_tf32 = True`` or ``set_float32_matmul_precision("high")``, or inherited
    ("none") from ``torch.backends.fp32_precision``. Not ``allow_tf32`` itself: reading it raises once
    either of the fp32_precision settings has been made."""
    precision = torch.backends.cuda.matmul.fp32_precision
    return (torch.backends.fp32_precision if precision == "none" else precision) == "tf32"


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision. float32: "tf32x3" (three TF32 tensor-core products, about float32's accuracy; an
    "ieee" dot runs on the FMA units instead) unless torch lets float32 matmuls use plain TF32
    (``float32_matmuls_use_tf32``); float64: "ieee"."""
    if dtype == torch.float32:
        return "tf32" if float32_matmuls_use_tf32() else "tf32x3"
    return "ieee"
