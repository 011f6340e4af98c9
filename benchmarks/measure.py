"""How things are measured: the step that is timed, parity against the float64 reference
(docs/design.md §5), round-robin timing, saved-activation bytes, the process's memory, and the facts
about the machine (docs/design.md §6)."""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import dmup_kernels
from dmup_kernels._extension import runnable_cpu_isas

from .cases import STACK_OPS, Case, Problem
from .variants import eager_module

TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-10}
"""Largest accepted ||out - ref|| / ||ref|| against the float64 reference, per compute dtype (docs/design.md §5.3)."""


def synchronize(device: torch.device | str) -> None:
    """Waits for queued device work, so that a timing covers it (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(module: nn.Module, inputs: Sequence[Tensor], mode: str) -> Tensor:
    """One timed call. "fwd": ``module(*inputs)`` under ``torch.no_grad()`` (inference).
    "fwd+bwd": a training step, grads reset to None, ``loss = y.square().mean()``, ``loss.backward()``."""
    if mode == "fwd":
        with torch.no_grad():
            return module(*inputs)
    for tensor in inputs:
        tensor.grad = None
    for param in module.parameters():
        param.grad = None
    y = module(*inputs)
    y.square().mean().backward()
    return y


def collect(
    module: nn.Module, names: Iterable[str], inputs: Sequence[Tensor], y: Tensor, mode: str
) -> dict[str, Tensor | None]:
    """The results a parity check compares: ``out``, and in "fwd+bwd" mode ``grad_<input>`` and
    ``grad_<parameter>`` for every input and parameter (None where a gradient is missing)."""
    results: dict[str, Tensor | None] = {"out": y.detach()}
    if mode == "fwd+bwd":
        for name, tensor in zip(names, inputs):
            results[f"grad_{name}"] = tensor.grad
        for name, param in getattr(module, "_orig_mod", module).named_parameters():  # torch.compile wraps
            results[f"grad_{name}"] = param.grad
    return results


def reference_results(problem: Problem) -> dict[str, Tensor | None]:
    """The eager reference on the problem's values upcast to float64, on the CPU (docs/design.md §5.1)."""
    case = problem.case
    params = {name: value.double() for name, value in problem.params.items()}
    module = eager_module(case, params, "cpu")
    inputs = problem.leaf_inputs("cpu", torch.float64)
    y = step(module, inputs, case.mode)
    return collect(module, problem.inputs, inputs, y, case.mode)


def rel_err(out: Tensor | None, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (absolute if ref is 0); inf for a missing, misshapen or
    non-finite ``out``."""
    if out is None or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        return math.inf
    denom = float(ref.norm())
    num = float((out - ref).norm())
    return num / denom if denom > 0 else num


@dataclass
class Parity:
    """Relative errors of one variant's results against the reference, and the verdict."""

    errors: dict[str, float]
    tolerance: float
    grad_tolerance: float

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    @property
    def ok(self) -> bool:
        def within(name: str, err: float) -> bool:
            return math.isfinite(err) and err <= (self.tolerance if name == "out" else self.grad_tolerance)

        return all(within(name, err) for name, err in self.errors.items())

    def describe(self) -> str:
        parts = " ".join(f"{name}={err:.2e}" for name, err in self.errors.items())
        return f"{parts} (tolerance {self.tolerance:.0e}, gradients {self.grad_tolerance:.0e})"


KINKED_ACTIVATIONS: tuple[str, ...] = ("relu", "abs")
"""Activations whose derivative jumps at 0: where a pre-activation h lies within rounding of 0, float32
and float64 can take different sides, and the gradients of that one element differ by O(1)."""


def one_flip_error(case: Case) -> float | None:
    """Order of magnitude of the relative gradient error that one such activation-mask flip causes in a
    training step of a stack (in the hidden layer of an MLP stack): s / sqrt(B * n) (the flipped element's du ~
    s * g, against ||g|| over B*n elements). At (n, B, L) = (64, 128, 256) about 7e-4, above the float32
    tolerance; eager float32 itself flips 0-2 of the B*n*L elements there. None where it does not apply."""
    if case.op not in STACK_OPS or case.mode != "fwd+bwd" or case.activation not in KINKED_ACTIVATIONS:
        return None
    return case.scale / math.sqrt(case.batch * case.width)


FLIPS_ALLOWED = 4
"""Gradients of relu/abs training steps may differ from the float64 reference by this many mask flips."""


def grad_tolerance(case: Case) -> float:
    """The dtype's tolerance, widened for kinked activations to FLIPS_ALLOWED times one_flip_error:
    a flip is a rounding accident of float32 itself (eager float32 has them too), not a kernel error."""
    flip = one_flip_error(case) if case.dtype != torch.float64 else None
    return max(TOLERANCE[case.dtype], FLIPS_ALLOWED * flip) if flip is not None else TOLERANCE[case.dtype]


def check_parity(results: dict[str, Tensor | None], reference: dict[str, Tensor | None], case: Case) -> Parity:
    """Compares every result the reference has (a result the variant lacks counts as an infinite error):
    the output within the dtype's tolerance, gradients within grad_tolerance(case)."""
    errors = {name: rel_err(results.get(name), ref) for name, ref in reference.items() if ref is not None}
    return Parity(errors, TOLERANCE[case.dtype], grad_tolerance(case))


def first_call_with_parity(
    module: nn.Module, problem: Problem, reference: dict[str, Tensor | None], device: torch.device | str = "cpu"
) -> tuple[float, list[Tensor], Parity]:
    """The first call of ``module`` on fresh leaf copies of the problem's inputs, timed (for torch.compile
    this includes compilation), with its results checked against ``reference`` (``reference_results``).
    Returns (milliseconds, the inputs to keep using for timing, the parity verdict)."""
    case = problem.case
    inputs = problem.leaf_inputs(device)
    start = time.perf_counter()
    y = step(module, inputs, case.mode)
    synchronize(device)
    first_ms = (time.perf_counter() - start) * 1e3
    parity = check_parity(collect(module, problem.inputs, inputs, y, case.mode), reference, case)
    return first_ms, inputs, parity


def saved_activation_bytes(module: nn.Module, inputs: Sequence[Tensor]) -> int:
    """Bytes held for backward by one forward of ``module``: the ``untyped_storage().nbytes()`` of every
    tensor saved for backward (seen through ``torch.autograd.graph.saved_tensors_hooks``), counted once
    per storage (deduplicated by ``data_ptr``), leaving out the storages of the module's parameters."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}
    kept: list[Tensor] = []  # keeps every saved storage alive, so no data_ptr is reused meanwhile

    def pack(tensor: Tensor) -> Tensor:
        kept.append(tensor)
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            return tensor
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = module(*inputs)
    del y
    kept.clear()
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in parameter_storages)


def proc_kib(path: str, field: str) -> int:
    """The value of ``field`` (a "Name:  value kB" line) in the Linux proc file ``path``, in bytes."""
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(f"{field} not in {path}")


def resident_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    return proc_kib("/proc/self/status", "VmRSS")


def peak_resident_bytes() -> int:
    """This process's peak resident set size (VmHWM, the high-water mark of its address space). Not
    ``resource.getrusage().ru_maxrss``: on Linux a child started by (v)fork and exec starts that at its
    parent's peak (a child of a 519 MiB parent reported 519 MiB while 11 MiB was resident)."""
    return proc_kib("/proc/self/status", "VmHWM")


def available_memory_bytes() -> int:
    """Memory the kernel can give new allocations without swapping (MemAvailable of /proc/meminfo)."""
    return proc_kib("/proc/meminfo", "MemAvailable")


def wall_clock_timer(call: Callable[[], object]) -> float:
    """Seconds one call takes on the CPU."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


class CudaEventTimer:
    """Seconds one call's GPU work takes on the current stream, between two CUDA events."""

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, call: Callable[[], object]) -> float:
        self.start.record()
        call()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def cuda_graphed(call: Callable[[], object], warmup: int = 3) -> Callable[[], object]:
    """``call`` captured in a CUDA graph (after warm-up calls on a side stream, which also run any
    autotuning); replaying it removes the launch overhead that dominates small shapes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def copy_gbps(device: torch.device | str, nbytes: int = 1 << 28, repeats: int = 7) -> float:
    """The device's measured copy bandwidth (read + write bytes over the median time of a large copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timer = CudaEventTimer() if torch.device(device).type == "cuda" else wall_clock_timer
    seconds = [timer(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * nbytes / statistics.median(seconds) / 1e9


ROUND_ORDER_SEED = 0
"""Seeds the order of the variants in each timed round of time_round_robin: the same orders in every run."""


def time_round_robin(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    budget_s: float,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Times every call in ``calls`` with their repeats interleaved: each round calls each variant once, in
    an order drawn afresh (from a fixed seed), so that no variant is always first or always follows the same
    other variant, whose buffers it finds in the caches. ``warmup`` untimed rounds first; then
    enough rounds to fill ``budget_s`` (estimated from the last warm-up round), clamped to
    [min_repeats, max_repeats]. Python's garbage collector is off while timing.

    Returns milliseconds per call for each name, and the error message of any call that raised
    (that variant is dropped from later rounds)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    errors: dict[str, str] = {}
    timer = CudaEventTimer() if torch.device(device).type == "cuda" else wall_clock_timer

    def run_round(order: list[str], record: bool) -> float:
        total = 0.0
        for name in order:
            if name in errors:
                continue
            try:
                elapsed = timer(calls[name])
            except Exception as error:  # noqa: BLE001 - reported, not hidden
                errors[name] = f"{type(error).__name__}: {error}"
                continue
            total += elapsed
            if record:
                times[name].append(elapsed * 1e3)
        return total

    names = list(calls)
    gc.collect()
    gc.disable()
    try:
        round_s = 0.0
        for _ in range(warmup):
            round_s = run_round(names, record=False)
        repeats = max_repeats if round_s <= 0 else math.ceil(budget_s / round_s)
        repeats = max(min_repeats, min(max_repeats, repeats))
        orders = random.Random(ROUND_ORDER_SEED)
        for _ in range(repeats):
            run_round(orders.sample(names, len(names)), record=True)
    finally:
        gc.enable()
    return {name: ms for name, ms in times.items() if name not in errors}, errors


def summarize(ms: Sequence[float]) -> dict[str, float]:
    """median / min / max of a list of milliseconds."""
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


CEILING_WARMUP_CALLS = 2
"""Untimed matmuls before the ceiling is timed: the first call pays for allocation and the BLAS's
thread start-up, which is not its rate."""


def matmul_gflops(
    size: int = 2048, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", repeats: int = 7
) -> dict[str, float]:
    """The machine's large-GEMM rate (the ceiling, docs/design.md §6.5): a (size x size) @ (size x size)
    matmul, CEILING_WARMUP_CALLS warm-up calls, then ``repeats`` timed calls; GFLOP/s of the median and of
    the fastest call."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen, dtype=dtype).to(device)
    b = torch.randn(size, size, generator=gen, dtype=dtype).to(device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    for _ in range(CEILING_WARMUP_CALLS):
        torch.mm(a, b, out=out)
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    flops = 2 * size**3
    return {
        "size": size,
        "median_gflops": flops / statistics.median(seconds) / 1e9,
        "best_gflops": flops / min(seconds) / 1e9,
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The commit of the checkout that holds dmup_kernels, if it is a git checkout."""
    try:
        root = Path(dmup_kernels.__file__).resolve().parent.parent
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine makes timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, object]:
    """Facts stated with every result: threads, software versions, CPU (and GPU) model."""
    device = torch.device(device)
    info: dict[str, object] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "dmup_kernels_cpp": dmup_kernels.HAS_CPP,
        "dmup_cpu_isa": dmup_kernels.cpu_isa(),
        "dmup_runnable_cpu_isas": list(runnable_cpu_isas()),
        "dmup_kernels_backends": list(dmup_kernels.BACKENDS),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu_model"] = torch.cuda.get_device_name(device)
    return info
