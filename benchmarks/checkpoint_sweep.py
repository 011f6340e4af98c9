"""Checkpoint sweep: time per step and peak memory of a ResidualStack training step against depth, with
and without depth checkpointing; benchmarks/report.py prints the table and draws the plot.

    python -m benchmarks.checkpoint_sweep [--max-depth L] [--variants NAMES] [--threads N]
                                          [--out bench-results-checkpoint-sweep.json] [--plot PNG]

Separate from ``python -m benchmarks.run``: every point runs in a process of its own, so that its peak
memory is its own, and the deepest points take minutes per step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .cases import CHECKPOINT_SWEEP_DEPTHS, Case, checkpoint_sweep_case, checkpoint_sweep_cases, make_problem
from .measure import (
    available_memory_bytes,
    load_average,
    machine_info,
    peak_resident_bytes,
    resident_bytes,
    step,
    summarize,
    time_round_robin,
)
from .report import checkpoint_sweep_table, format_bytes, plot_checkpoint_sweep, write_json
from .variants import CHECKPOINT_SWEEP_VARIANTS, Variant

CALIBRATION_DEPTHS: tuple[int, ...] = (64, 256)
"""Each variant is first measured at these depths (seconds each): the line through them estimates the
memory of its first sweep point; later points are estimated from the two deepest points measured."""

MEMORY_SAFETY_FRACTION = 0.8
"""A point runs only when its estimated peak, plus the resident memory of a fresh process, is at most
this fraction of MemAvailable read just before it: the rest is left to the estimate's error and to
whatever else runs on the machine meanwhile."""

TIMING = {"warmup": 1, "min_repeats": 1, "max_repeats": 5, "budget_s": 30.0}
"""One warm-up step, then enough timed steps to fill budget_s, between 1 and 5 (time_round_robin): a step
at L=2^16 takes minutes on 2 cores, so the deepest points time a single step."""

REPO_ROOT = Path(__file__).resolve().parent.parent
STDERR_TAIL_LINES = 20
"""A failed point's record keeps this many last lines of its process's stderr (its error is the last one)."""

DESCRIPTION = """\
Times a training step (forward and backward of loss = y.square().mean()) of a ResidualStack at n=128,
B=1024 (relu, block "post", mean subtraction, float32, Depth-muP branch scale 1/sqrt(L)) for
L = 2^10 .. 2^16, and measures the peak memory of each, for four variants: "eager" (the reference
backend, autograd saving every layer), "eager-sqrt" (the same layers under torch.utils.checkpoint
over ceil(sqrt(L)) segments), "cpp" (saving every layer) and "cpp-sqrt" (ResidualStack(...,
checkpoint="sqrt"): the stream kept every ceil(sqrt(L)) layers, the rest recomputed in the backward).

Every (variant, L) point runs in a fresh subprocess, one at a time: it builds the problem, takes one
warm-up step and up to 5 timed steps (fewer when steps are slow; the median is reported). Its peak
memory is the peak resident set size of that process (VmHWM) minus its resident size before the
problem was built (both are in the JSON). Before a point runs, its peak is estimated on the line through
the two deepest points of the same variant measured so far (at first the calibration points at
L = %(calibration)s, which the table leaves out); a point whose estimate, plus the memory of a fresh
process, exceeds %(fraction).0f%% of MemAvailable is not run, and the table says how much it needs instead.

Resident memory includes what glibc's malloc keeps after tensors are freed: once its adaptive mmap
threshold has risen, eager's intermediate tensors (512 KiB each at this shape) come from its heap, and
much of their memory stays resident after they are freed, so eager-sqrt's peak is far above what its
tensors hold (at L=256: 0.65 GiB, against under 0.1 GiB with the threshold held at 128 KiB).
MALLOC_MMAP_THRESHOLD_=131072 in the environment (the subprocesses inherit it; the JSON records it)
measures the tensors instead, at the price of a page fault on every fresh page, which slows eager
steps down severalfold.
"""

EPILOG = """\
Output: the table (time per step in seconds and peak GiB per variant, and the step-time ratio of each
checkpointing variant to the variant that saves every layer), the JSON file (--out; "records": the
points measured, calibration ones marked; "skipped": the points not run, with the memory they need) and
the plot (--plot: peak memory and time per step against L, one line per variant).
At L=2^16 a cpp step takes minutes on 2 cores: the whole sweep takes hours. --max-depth 1024 is a
check of minutes.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [variant.name for variant in CHECKPOINT_SWEEP_VARIANTS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.checkpoint_sweep",
        description=DESCRIPTION
        % {"calibration": ", ".join(map(str, CALIBRATION_DEPTHS)), "fraction": 100 * MEMORY_SAFETY_FRACTION},
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--max-depth",
        type=int,
        default=CHECKPOINT_SWEEP_DEPTHS[-1],
        help=f"deepest L of the sweep, at least {CHECKPOINT_SWEEP_DEPTHS[0]} (default: %(default)s)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(names),
        help="comma-separated variants to run, of %(default)s (default: all)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's default)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results-checkpoint-sweep.json"),
        help="JSON output (default: %(default)s)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG output (default: --out with the suffix .png)")
    parser.add_argument(
        "--point", nargs=2, metavar=("VARIANT", "DEPTH"), default=None, help=argparse.SUPPRESS
    )  # one point, in the subprocess the sweep starts for it
    args = parser.parse_args(argv)
    if args.max_depth < CHECKPOINT_SWEEP_DEPTHS[0]:
        parser.error(f"--max-depth must be at least {CHECKPOINT_SWEEP_DEPTHS[0]}; got {args.max_depth}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    args.variants = args.variants.split(",")
    unknown = [name for name in args.variants if name not in names]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.plot is None:
        args.plot = args.out.with_suffix(".png")
    return args


# ------------------------------------------------------------------------------------- one point


def point_record(case: Case, variant: Variant) -> dict[str, Any]:
    """The fields of a record that describe the point, before anything is measured."""
    return {
        "case": case.name,
        "variant": variant.name,
        "depth": case.depth,
        "width": case.width,
        "batch": case.batch,
        "mode": case.mode,
        "activation": case.activation,
        "block": case.block,
        "mean_subtract": case.mean_subtract,
        "dtype": case.dtype_name,
        "threads": torch.get_num_threads(),
    }


def measure_point(variant: Variant, depth: int) -> dict[str, Any]:
    """Builds the problem and the module of ``variant`` at ``depth`` and times its training step; run
    in a process of its own (``--point``), so that the process's peak resident size is this point's.
    The problem's parameters are dropped once the module holds its copy of them."""
    case = checkpoint_sweep_case(depth)
    baseline = resident_bytes()
    problem = make_problem(case)
    module = variant.build(case, problem.params)
    inputs = problem.leaf_inputs()
    del problem
    call = functools.partial(step, module, inputs, case.mode)
    times, errors = time_round_robin({variant.name: call}, **TIMING)
    peak = peak_resident_bytes()
    record = point_record(case, variant)
    record.update(
        median_ms=None,
        repeats=0,
        baseline_rss_bytes=baseline,
        peak_rss_bytes=peak,
        peak_bytes=peak - baseline,
        error=errors.get(variant.name),
    )
    if variant.name in times:
        record.update(summarize(times[variant.name]), repeats=len(times[variant.name]))
    return record


def run_point(variant: Variant, depth: int, threads: int | None) -> dict[str, Any]:
    """``measure_point`` in a fresh subprocess; its record, or one with "error" set if it failed (the
    last line of its stderr, or the signal that killed it: SIGKILL is likely the out-of-memory killer)
    and "stderr_tail" holding the last STDERR_TAIL_LINES lines."""
    command = [sys.executable, "-m", "benchmarks.checkpoint_sweep", "--point", variant.name, str(depth)]
    if threads is not None:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        record = json.loads(result.stdout.splitlines()[-1])
    else:
        tail = result.stderr.strip().splitlines()[-STDERR_TAIL_LINES:]
        if result.returncode < 0:
            error = f"killed by {signal.Signals(-result.returncode).name}"
        else:
            error = f"exit status {result.returncode}: {tail[-1] if tail else 'no message'}"
        record = point_record(checkpoint_sweep_case(depth), variant)
        record.update(median_ms=None, repeats=0, peak_bytes=None, error=error, stderr_tail="\n".join(tail))
    record["process_s"] = time.perf_counter() - start
    return record


# ---------------------------------------------------------------------------------- memory estimate


def extrapolate_peak(measured: dict[int, int], depth: int) -> int | None:
    """Peak bytes at ``depth`` on the line through the two deepest points of ``measured`` (depth -> peak
    bytes), or None with fewer than two points.

    Saving every layer, the peak grows linearly in L (states, weights, weight gradients); checkpointing,
    as a + b*L + c*sqrt(L) (the weights, and about 2*sqrt(L) layers of states), which the line through
    two shallower depths overestimates: an estimate errs on the side of not running a point."""
    if len(measured) < 2:
        return None
    (shallow, shallow_peak), (deep, deep_peak) = sorted(measured.items())[-2:]
    slope = (deep_peak - shallow_peak) / (deep - shallow)
    return round(deep_peak + slope * (depth - deep))


class MemoryPlanner:
    """Keeps each variant's measured peaks and the resident size of a fresh process, and decides from
    them whether a point fits in the memory available now."""

    def __init__(self) -> None:
        self.peaks: dict[str, dict[int, int]] = {}
        self.process_bytes = 0

    def add(self, record: dict[str, Any]) -> None:
        """Adds the peak of a point that ran (a failed one adds nothing)."""
        if record["error"] is None:
            self.peaks.setdefault(record["variant"], {})[record["depth"]] = record["peak_bytes"]
            self.process_bytes = max(self.process_bytes, record["baseline_rss_bytes"])

    def estimate(self, variant: Variant, depth: int) -> int | None:
        """The estimated peak of ``variant`` at ``depth`` (``extrapolate_peak``), None before two points."""
        return extrapolate_peak(self.peaks.get(variant.name, {}), depth)

    def shortfall(self, estimate: int, available: int) -> str | None:
        """Why a point with this estimated peak cannot run with ``available`` bytes free, or None if it can."""
        needed = estimate + self.process_bytes
        if needed <= MEMORY_SAFETY_FRACTION * available:
            return None
        return (
            f"needs {format_bytes(estimate)} (estimate; {format_bytes(needed)} with the process), more than "
            f"{MEMORY_SAFETY_FRACTION:.0%} of the {format_bytes(available)} available"
        )


# ------------------------------------------------------------------------------------------- main


def header(machine: dict[str, Any], depths: list[int], variants: list[Variant]) -> str:
    """What the sweep runs and where: the shape, depths and variants, the machine, software and allocator."""
    case = checkpoint_sweep_case(depths[0])
    load = machine["loadavg_start"]
    threshold = machine["run"]["malloc_mmap_threshold"]
    return "\n".join(
        [
            f"dmup_kernels checkpoint sweep: ResidualStack training step, n={case.width}, B={case.batch}, "
            f"{case.activation}, block {case.block}, MS {'on' if case.mean_subtract else 'off'}, {case.dtype_name}, "
            f"Depth-muP; L = {', '.join(map(str, depths))}; variants {', '.join(v.name for v in variants)}",
            f"machine: {machine['cpu_model']} ({machine['logical_cpus']} logical CPUs, {machine['cpu_capability']}), "
            f"threads {machine['threads']}, MemAvailable {format_bytes(machine['mem_available_start'])}"
            + ("" if load is None else f", load average {load[0]:.2f}"),
            f"software: torch {machine['torch']}, python {machine['python']}, dmup_kernels C++ "
            f"{'built' if machine['dmup_kernels_cpp'] else 'NOT built'} ({machine['dmup_cpu_isa']}), "
            f"commit {str(machine['git_commit'])[:12]}",
            "malloc: glibc's adaptive mmap threshold (resident memory includes freed tensors its heap keeps)"
            if threshold is None
            else f"malloc: MALLOC_MMAP_THRESHOLD_={threshold} (resident memory tracks the tensors)",
        ]
    )


def sweep(args: argparse.Namespace) -> int:
    """Calibrates every variant, then runs the sweep's points shallowest first, one process at a time;
    prints a line per point and the table, writes the JSON after every point and the plot at the end.
    Returns 1 if a point failed, else 0."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    depths = [case.depth for case in checkpoint_sweep_cases(args.max_depth)]
    variants = [variant for variant in CHECKPOINT_SWEEP_VARIANTS if variant.name in args.variants]
    machine = machine_info()
    machine["mem_available_start"] = available_memory_bytes()
    machine["run"] = {
        "argv": sys.argv[1:],
        "depths": depths,
        "variants": [variant.name for variant in variants],
        "calibration_depths": list(CALIBRATION_DEPTHS),
        "memory_safety_fraction": MEMORY_SAFETY_FRACTION,
        "timing": TIMING,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    print(header(machine, depths, variants), flush=True)

    planner = MemoryPlanner()
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    start = time.perf_counter()

    def skip(variant: Variant, depth: int, reason: str, needs_bytes: int | None = None) -> None:
        case = checkpoint_sweep_case(depth)
        skipped.append(
            {"case": case.name, "variant": variant.name, "depth": depth, "reason": reason, "needs_bytes": needs_bytes}
        )
        print(f"L={depth:<6} {variant.name:<10} not run: {reason}", flush=True)

    def run(variant: Variant, depth: int, calibration: bool) -> None:
        estimate = planner.estimate(variant, depth)
        available = available_memory_bytes()
        if not calibration and estimate is None:
            skip(variant, depth, "no memory estimate (its calibration failed)")
            return
        shortfall = None if estimate is None else planner.shortfall(estimate, available)
        if shortfall is not None:
            skip(variant, depth, shortfall, estimate)
            return
        record = run_point(variant, depth, args.threads)
        record.update(calibration=calibration, estimate_bytes=estimate, available_bytes=available)
        planner.add(record)
        records.append(record)
        if record["error"] is None:
            estimated = "" if estimate is None else f" (estimated {format_bytes(estimate)})"
            print(
                f"L={depth:<6} {variant.name:<10} {record['median_ms'] / 1e3:9.3f} s/step ({record['repeats']} "
                f"timed), peak {format_bytes(record['peak_bytes'])}{estimated}"
                + (" [calibration]" if calibration else ""),
                flush=True,
            )
        else:
            print(f"L={depth:<6} {variant.name:<10} !!! ERROR: {record['error']}", flush=True)
        write_json(args.out, machine, records, skipped)

    runnable = []
    for variant in variants:
        reason = variant.unavailable()
        if reason is None:
            runnable.append(variant)
        else:
            for depth in depths:
                skip(variant, depth, reason)
    for variant in runnable:
        for depth in CALIBRATION_DEPTHS:
            run(variant, depth, calibration=True)
    for depth in depths:
        for variant in runnable:
            run(variant, depth, calibration=False)

    machine["wall_s"] = time.perf_counter() - start
    machine["loadavg_end"] = load_average()
    write_json(args.out, machine, records, skipped)
    print("\n" + checkpoint_sweep_table(records, skipped, [variant.name for variant in variants]))
    plotted = plot_checkpoint_sweep(records, skipped, machine, args.plot)
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if plotted else "") + f" ({machine['wall_s']:.0f} s)")
    failures = [record for record in records if record["error"] is not None]
    if failures:
        print(f"\n!!! {len(failures)} point(s) failed:", file=sys.stderr)
        for record in failures:
            print(f"!!!   {record['variant']} L={record['depth']}: {record['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.point is None:
        return sweep(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name, depth = args.point
    variant = next(variant for variant in CHECKPOINT_SWEEP_VARIANTS if variant.name == name)
    print(json.dumps(measure_point(variant, int(depth))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
