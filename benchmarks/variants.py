"""The peers timed side by side (docs/design.md §6.2): eager PyTorch, torch.compile of the same module, and each
dmup_kernels backend.

Every variant builds an ``nn.Module`` for a case whose forward takes the case's inputs (``x`` for a stack,
``ResidualStack`` or ``ResidualMLPStack``; ``x, branch_out`` for scaled_residual) and whose parameters hold
copies of the case's parameters. Each backend is one ``Variant(name, "backend")`` in ``VARIANTS``; it is skipped
wherever ``dmup_kernels`` says it cannot run (missing extension or triton, wrong device). "cpp-avx2"
is the cpp backend pinned to AVX2: listed only on machines that run AVX2 but default to another
instruction set (AVX-512), so that one run shows both. "cpp-sqrt" is the cpp backend with
``checkpoint="sqrt"``. Both are timed on the target table's cases only. ``CHECKPOINT_SWEEP_VARIANTS`` are
the peers of the checkpoint sweep (``checkpoint_sweep.py``): eager and cpp saving every layer for the
backward, and each keeping only every k-th state and recomputing the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

import dmup_kernels
from dmup_kernels import DEPTH_MUP
from dmup_kernels._extension import pinned_cpu_isa, runnable_cpu_isas
from dmup_kernels.ops import resolve_backend

from .cases import Case


class ScaledResidualModule(nn.Module):
    """``scaled_residual(x, branch_out)`` of a case through ``dmup_kernels.scaled_residual`` with the
    given backend ("reference" is the eager peer)."""

    def __init__(self, case: Case, backend: str) -> None:
        super().__init__()
        self.scale = case.scale
        self.activation = case.activation
        self.mean_subtract = case.mean_subtract
        self.backend = backend

    def forward(self, x: Tensor, branch_out: Tensor) -> Tensor:
        return dmup_kernels.scaled_residual(
            x, branch_out, self.scale, self.activation, self.mean_subtract, backend=self.backend
        )


def eager_module(case: Case, params: dict[str, Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """The eager peer of ``case``: the dmup_kernels module on the "reference" backend, a plain loop of
    eager PyTorch ops over the layers, with ``params`` (any dtype) copied onto ``device``. torch.compile
    compiles this module; in float64 on the CPU it is also the parity reference."""
    return backend_module(case, params, "reference", device)


def backend_module(
    case: Case,
    params: dict[str, Tensor],
    backend: str,
    device: torch.device | str = "cpu",
    checkpoint: int | str | None = None,
) -> nn.Module:
    """The dmup_kernels module of ``case`` running on ``backend`` (with ``checkpoint``), with ``params``
    copied in."""
    if case.op == "scaled_residual":
        return ScaledResidualModule(case, backend)
    settings = dict(
        activation=case.activation,
        mean_subtract=case.mean_subtract,
        bias=case.bias,
        parametrization=DEPTH_MUP,
        backend=backend,
        checkpoint=checkpoint,
        device=device,
        dtype=next(iter(params.values())).dtype,
    )
    if case.op == "residual_stack":
        module = dmup_kernels.ResidualStack(case.width, case.depth, block=case.block, **settings)
    else:
        module = dmup_kernels.ResidualMLPStack(case.width, case.hidden_width, case.depth, **settings)
    if module.scale != case.scale:
        raise AssertionError(f"{type(module).__name__} scale {module.scale} != case scale {case.scale}")
    with torch.no_grad():
        for name, value in params.items():
            getattr(module, name).copy_(value)
    return module


@dataclass(frozen=True)
class Variant:
    """A timed peer. kind "eager": the reference module; "compile": ``torch.compile`` of that same
    module (default options, ``dynamic=False``; dynamo's caches are reset first so each case compiles
    from scratch); "backend": ``dmup_kernels`` with ``backend=backend or name`` and ``checkpoint``, its
    float32 CPU kernels pinned to ``cpu_isa`` when that is set (run its calls inside ``pinned()``)."""

    name: str
    kind: str
    backend: str | None = None
    cpu_isa: str | None = None
    checkpoint: int | str | None = None

    @property
    def table_only(self) -> bool:
        """Timed on the target table's cases only: a pinned instruction set, or checkpoints."""
        return self.cpu_isa is not None or self.checkpoint is not None

    def unavailable(self, device: torch.device | str = "cpu") -> str | None:
        """Why this variant cannot run on ``device`` here, or None if it can."""
        if self.kind != "backend":
            return None
        try:
            resolve_backend(self.backend or self.name, torch.device(device))
        except (RuntimeError, ValueError) as error:
            return str(error)
        return None

    def pinned(self) -> contextlib.AbstractContextManager[None]:
        """The variant's CPU instruction set in force (nothing to do without one)."""
        return pinned_cpu_isa(self.cpu_isa) if self.cpu_isa is not None else contextlib.nullcontext()

    def build(self, case: Case, params: dict[str, Tensor], device: torch.device | str = "cpu") -> nn.Module:
        if self.kind == "eager":
            return eager_module(case, params, device)
        if self.kind == "compile":
            torch._dynamo.reset()
            return torch.compile(eager_module(case, params, device), dynamic=False)
        if self.kind == "backend":
            return backend_module(case, params, self.backend or self.name, device, self.checkpoint)
        raise ValueError(f"unknown variant kind {self.kind!r}")


PINNED_CPU_ISA_VARIANTS = (Variant("cpp-avx2", "backend", backend="cpp", cpu_isa="avx2"),)
CHECKPOINT_VARIANT = Variant("cpp-sqrt", "backend", backend="cpp", checkpoint="sqrt")
"""The cpp backend with depth checkpoints every ceil(sqrt(L)) layers; its cost is its median over cpp's."""

VARIANTS: tuple[Variant, ...] = (
    Variant("eager", "eager"),
    Variant("compile", "compile"),
    Variant("cpp", "backend"),
    *(v for v in PINNED_CPU_ISA_VARIANTS if v.cpu_isa in runnable_cpu_isas() and v.cpu_isa != dmup_kernels.cpu_isa()),
    CHECKPOINT_VARIANT,
    Variant("triton", "backend"),
    Variant("cuda", "backend"),
)
"""All variants of this machine, in table order. Ratios are taken against the "eager" and "compile" rows."""

PEERS = ("eager", "compile")
"""The variants every other variant is compared with (ratio = peer median / variant median)."""

CHECKPOINT_SWEEP_VARIANTS: tuple[Variant, ...] = (
    Variant("eager", "eager"),
    Variant("eager-sqrt", "backend", backend="reference", checkpoint="sqrt"),
    Variant("cpp", "backend"),
    CHECKPOINT_VARIANT,
)
"""The checkpoint sweep's variants, in table order: eager and cpp saving every layer, and each keeping
the stream every ceil(sqrt(L)) layers only (the reference backend through torch.utils.checkpoint over
its segments, the cpp backend in its kernels)."""

SAVE_ALL_PEERS: dict[str, str] = {"eager-sqrt": "eager", "cpp-sqrt": "cpp"}
"""Each checkpointing variant of the sweep and the variant that saves every layer of the same stack: the
sweep reports the ratio of their step times (the cost of the recomputation)."""
