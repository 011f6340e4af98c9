"""Shared fixtures and helpers of the test suite (numerical parity protocol, docs/design.md §5).

- ``rel_err(out, ref)``: ||out - ref|| / ||ref|| in float64 (absolute norm when ||ref|| = 0).
- ``seed`` (autouse): a fresh seed per test case, derived from the pytest node id, applied to the
  global torch generator; tests that need their own stream build one with ``make_generator(seed)``.
- TRITON_INTERPRET=1 is set before dmup_kernels is imported (unless set otherwise), so backend="triton"
  runs on CPU tensors; with TRITON_INTERPRET=0 on a GPU (make gpu-check) it runs on CUDA tensors.
  ``TRITON_DEVICE`` says which; the ``triton_device`` fixture parametrizes a test over it;
  ``needs_cpp`` / ``needs_triton`` / ``needs_cuda`` skip a test where that backend cannot run.
- ``OP_BACKENDS``: "cpp", "triton" and "cuda" with those marks, the ``backend`` parameter of the op tests;
  ``backend_device(backend)`` is where their tensors go (the CPU for "reference").
- ``nan_poison``: deterministic mode + ``fill_uninitialized_memory``, so torch.empty / at::empty
  (also inside our C++ ops) return NaN-filled memory and an output element a kernel never writes
  shows up as NaN. The previous settings are restored after the test.
- ``num_threads(count)``: a context manager that runs its body with ``count`` torch threads.
- ``saved_bytes(fn, exclude)``: the bytes autograd saves for backward while ``fn()`` runs.
- ``OpLog``: a dispatch mode that records the ops a call runs; ``graph_nodes(tensor)``: the autograd nodes
  behind a tensor (a fused op is one node, an eager loop one per layer and op).
- ``cpu_isa``: runs a test once per instruction set this CPU can run (``CPU_ISAS``), with the float32
  CPU kernels pinned to it. float64 always runs the portable kernel, so a float64 case runs once.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

# The Triton kernels run on CPU tensors through the interpreter, which must be on before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.utils.deterministic
from torch.utils._python_dispatch import TorchDispatchMode

import dmup_kernels
from dmup_kernels._extension import _C, pinned_cpu_isa, runnable_cpu_isas
from dmup_kernels.ops._backend import HAS_CUDA_KERNELS
from dmup_kernels.triton import HAS_TRITON, INTERPRETED

REPO = Path(__file__).resolve().parents[1]
"""The repository root: dmup_kernels, benchmarks, examples and csrc are below it."""

needs_cpp = pytest.mark.skipif(not dmup_kernels.HAS_CPP, reason="C++ extension not built")
TRITON_DEVICE: str | None = None
"""Where the Triton kernels run in this process: "cpu" under the interpreter, "cuda" on a GPU without it."""
if HAS_TRITON:
    TRITON_DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="needs triton, and TRITON_INTERPRET=1 or a GPU with TRITON_INTERPRET=0"
)


@pytest.fixture(params=[TRITON_DEVICE or "none"])
def triton_device(request: pytest.FixtureRequest) -> str:
    """The device of the tensors a Triton test runs on (see TRITON_DEVICE)."""
    return request.param


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: the CUDA kernels run only on a GPU"
    if not HAS_CUDA_KERNELS:
        return "dmup_kernels._C was built without its CUDA kernels (it needs a CUDA torch and CUDA_HOME)"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
needs_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))

OP_BACKENDS = [
    pytest.param("cpp", marks=needs_cpp),
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda", marks=needs_cuda),
]
"""The backends of every op test (pytest.param, each skipped where it cannot run)."""


def backend_device(backend: str) -> str:
    """The device of the tensors ``backend`` runs on here ("reference" runs anywhere; the tests keep it on the CPU)."""
    return {"reference": "cpu", "cpp": "cpu", "triton": TRITON_DEVICE or "cpu", "cuda": "cuda"}[backend]


# Deterministic mode (nan_poison) lets cuBLAS run only with a fixed workspace configuration, which
# cuBLAS reads when CUDA starts: set before any test touches a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64; the absolute norm ||out - ref|| when ref is all zero.

    NaN or inf anywhere in ``out`` gives NaN/inf, which fails every ``<`` comparison.
    """
    assert isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}"
    out64 = out.detach().to(device="cpu", dtype=torch.float64)
    ref64 = ref.detach().to(device="cpu", dtype=torch.float64)
    diff = torch.linalg.vector_norm(out64 - ref64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    if not torch.isfinite(out64).all():
        return float("nan")
    return diff / norm if norm > 0 else diff


def seed_for(nodeid: str) -> int:
    """A stable 31-bit seed for one test case (different for every parametrization)."""
    return zlib.crc32(nodeid.encode()) & 0x7FFFFFFF


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch's global generator with a value derived from the test node id; returns it. The
    instruction set a test is pinned to is left out: every ISA sees the same inputs."""
    nodeid = request.node.nodeid
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    if "cpu_isa" in params:
        nodeid = nodeid.replace(f"[{params['cpu_isa']}-", "[", 1).replace(f"-{params['cpu_isa']}]", "]", 1)
    value = seed_for(nodeid)
    torch.manual_seed(value)
    return value


@pytest.fixture
def nan_poison():
    """Fills every uninitialised allocation with NaN for the duration of the test."""
    previous_enabled = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_enabled, warn_only=previous_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the storages autograd saves while ``fn()`` runs, each storage once, minus ``exclude``'s
    (the parameters, which are not activations). Runs the backward of ``fn().sum()`` to show that the
    saved state is usable."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(storages.values())


class OpLog(TorchDispatchMode):
    """Records the ops that reach the dispatcher (names in ``calls``, the last arguments in ``args``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.args: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        self.args[str(func)] = args
        return func(*args, **(kwargs or {}))


def graph_nodes(tensor: torch.Tensor) -> list[str]:
    seen, names, todo = set(), [], [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


CPU_ISAS: tuple[str, ...] = runnable_cpu_isas()


@pytest.fixture(params=CPU_ISAS or ("none",))
def cpu_isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Pins the float32 CPU kernels to one runnable instruction set for the test; yields its name."""
    with pinned_cpu_isa(request.param) if _C is not None else contextlib.nullcontext():
        yield request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Runs a ``cpu_isa`` test case on one instruction set only where it does not run a float32 CPU
    kernel: float64 (the same portable kernel everywhere) or a backend other than cpp."""

    def repeated(item: pytest.Item) -> bool:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if params.get("cpu_isa") in (None, "none", *CPU_ISAS[:1]):  # not a cpu_isa test, or its first ISA
            return False
        return any(v is torch.float64 for v in params.values()) or params.get("backend", "cpp") != "cpp"

    drop = [item for item in items if repeated(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if not repeated(item)]
