"""Benchmark runner: times eager PyTorch, torch.compile and every dmup_kernels backend side by side,
after checking each against the float64 reference; benchmarks/report.py prints a table per case and
writes JSON + a plot.

    python -m benchmarks.run [--quick] [--no-compile] [--threads N] [--out bench-results.json] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .cases import STACK_OPS, Case, make_problem, runner_cases
from .measure import (
    TOLERANCE,
    copy_gbps,
    cuda_graphed,
    first_call_with_parity,
    grad_tolerance,
    load_average,
    machine_info,
    matmul_gflops,
    one_flip_error,
    reference_results,
    saved_activation_bytes,
    step,
    summarize,
    time_round_robin,
)
from .report import case_table, checkpoint_summary, header, plot, target_summary, write_json
from .traffic import model_bytes_per_layer
from .variants import PEERS, VARIANTS, Variant, eager_module

CUDA_GRAPH_MAX_ELEMENTS = 1 << 16
"""On a GPU, inference cases with B*n up to this are timed as CUDA graph replays (launch-bound shapes)."""

TIMING = {
    # warm-up rounds, then enough rounds to fill budget_s, clamped to [min_repeats, max_repeats]
    "full": {"warmup": 3, "min_repeats": 7, "max_repeats": 200, "budget_s": 4.0},
    "quick": {"warmup": 1, "min_repeats": 5, "max_repeats": 30, "budget_s": 0.6},
}

DESCRIPTION = """\
Times, for each case (shape x mode), the variants side by side: "eager" (a plain nn.Module looping over
dmup_kernels.reference), "compile" (torch.compile of that same module) and each dmup_kernels backend
(%(backends)s). Each variant is first run once on the case's inputs: that call is timed as "first ms"
(for compile it includes compilation; inductor's caches start empty in every run) and its output and,
in fwd+bwd mode, input and weight gradients are compared with the float64 eager reference
(rel_err = max ||out - ref|| / ||ref||). Then warm-up, then repeats interleaved round-robin across
variants; median/min/max in ms. "x eager"/"x compile" = that peer's median / this median (speed-up,
from the same run). GFLOP/s counts 2*B*n*n per GEMM, 1 GEMM per layer in fwd, 3 in fwd+bwd (an MLP layer:
2*B*n*m per GEMM, 2 in fwd, 6 in fwd+bwd); the ceiling is a 2048x2048 float32 matmul measured at start-up.
"saved" = bytes saved for backward by one forward (saved_tensors_hooks, storages counted once, parameters
left out). Below each stack case: the DRAM bytes per layer that eager and each GPU kernel must move
(benchmarks/traffic.py, a model from the shapes); on a GPU also the bandwidth that model implies at the
measured time, against the measured copy bandwidth. On a GPU, times come from CUDA events, and inference
cases with B*n <= %(graph_max)d replay a CUDA graph of the call.
"""

EPILOG = """\
modes: fwd = inference (torch.no_grad); fwd+bwd = training step, loss = y.square().mean(), backward.

cases (see benchmarks/cases.py; list them with --list):
  full run: scaled_residual at (B,n) = (64,64) (256,128) (1024,256) (4096,512), fwd and fwd+bwd;
            ResidualStack depth sweep L = 64 128 256 512 1024 at (n,B) = (32,64) and (64,128), fwd and
            fwd+bwd; the target rows (n,B,L) = (32,64,1024) (64,128,512) (128,256,256) (256,512,128)
            (128,8,256), fwd+bwd, and of ResidualMLPStack (n,m,B,L) = (32,128,64,512) (64,256,128,256)
            (128,512,256,128), fwd+bwd. torch.compile is timed on cases with L <= 256 and on the target rows
            (compiling a training step took 70-90 s at L=256 and 330 s at L=1024 on 2 cores); about
            25 minutes on 2 cores.
  --quick:  scaled_residual at (64,64) and (1024,256); sweep L = 64 and 256; the target rows;
            fewer repeats; torch.compile only on cases with L <= 64. About 2-3 minutes on 2 cores.

Parity: a variant whose output rel_err exceeds the tolerance (float32: 1e-4), or whose gradient rel_err
exceeds the gradient tolerance, is marked FAIL in the table and makes the runner exit with status 1 at
the end (as does a variant that raises). The gradient tolerance is the same, except in relu/abs training
steps: there a single pre-activation that float32 rounds to the other side of 0 moves the gradients by
about s/sqrt(B*n) (~5e-4 at n=64, B=128), eager float32 included, so up to 4 such flips are allowed
(gradient tolerance max(1e-4, 4*s/sqrt(B*n))).
Timings are never asserted. Without --out the JSON goes to bench-results.json; the plot (GFLOP/s vs depth, one line per
variant) goes next to it with the suffix .png.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    backends = ", ".join(v.name for v in VARIANTS if v.kind == "backend")
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=DESCRIPTION % {"backends": backends, "graph_max": CUDA_GRAPH_MAX_ELEMENTS},
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small run: fewer cases and repeats (see below)")
    parser.add_argument("--no-compile", action="store_true", help="do not time torch.compile at all")
    parser.add_argument(
        "--compile-all", action="store_true", help="time torch.compile on every case (a full run then takes ~30 min)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's default)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results.json"), help="JSON output (default: %(default)s)"
    )
    parser.add_argument(
        "--only", metavar="SUBSTRING", default=None, help="run only cases whose name contains SUBSTRING"
    )
    parser.add_argument("--device", default="cpu", help="device of the timed tensors (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the cases of this run and exit")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    if args.no_compile and args.compile_all:
        parser.error("--no-compile and --compile-all contradict each other")
    return args


# ---------------------------------------------------------------------------------------------- compile


def prepare_compile() -> tuple[str | None, float]:
    """Makes torch.compile's first-call times cold and reproducible: inductor's on-disk caches go to a
    fresh temporary directory (unless TORCHINDUCTOR_CACHE_DIR is set) and the FX-graph and autograd
    caches are off. Then one tiny compile absorbs the one-time start-up cost (imports, C++ header
    precompilation) so that it is not charged to the first case. Returns (temporary dir, warm-up s)."""
    temporary = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        temporary = tempfile.mkdtemp(prefix="dmup-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = temporary
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    start = time.perf_counter()
    case = Case("residual_stack", 4, 8, 2)
    torch._dynamo.reset()
    module = torch.compile(eager_module(case, {"weight": torch.randn(2, 8, 8)}), dynamic=False)
    x = torch.randn(4, 8, requires_grad=True)
    module(x).square().mean().backward()
    torch._dynamo.reset()
    return temporary, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- a case


def base_record(case: Case, variant: Variant, threads: int) -> dict[str, Any]:
    return {
        "op": case.op,
        "case": case.name,
        "variant": variant.name,
        "dtype": case.dtype_name,
        "batch": case.batch,
        "width": case.width,
        "hidden_width": case.hidden_width,
        "depth": case.depth,
        "mode": case.mode,
        "activation": case.activation,
        "block": case.block,
        "mean_subtract": case.mean_subtract,
        "bias": case.bias,
        "threads": threads,
        "tags": list(case.tags),
        "targets": None if case.targets is None else {"vs_eager": case.targets[0], "vs_compile": case.targets[1]},
        "median_ms": None,
        "min_ms": None,
        "max_ms": None,
        "repeats": 0,
        "rel_err": None,
        "rel_errs": None,
        "tolerance": TOLERANCE[case.dtype],
        "grad_tolerance": grad_tolerance(case),
        "parity_ok": None,
        "ratio_vs_eager": None,
        "ratio_vs_compile": None,
        "gflops": None,
        "rows_layers_per_s": None,
        "first_call_ms": None,
        "saved_bytes": None,
        "model_bytes_per_layer": model_bytes_per_layer(case, variant.name),
        "model_gbps": None,
        "cuda_graph": False,
        "error": None,
    }


def pinned_step(variant: Variant, module: torch.nn.Module, inputs: Any, mode: str) -> None:
    """One timed call of ``variant`` (with its CPU instruction set pinned, if it has one)."""
    with variant.pinned():
        step(module, inputs, mode)


def run_case(
    case: Case, variants: list[Variant], timing: dict[str, Any], device: torch.device
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Parity, first call, saved bytes and round-robin timing of every variant on one case.
    Returns the records of the variants that ran (with an "error" where one raised) and
    {variant: reason} for those skipped."""
    threads = torch.get_num_threads()
    problem = make_problem(case)
    reference = reference_results(problem)
    records: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    calls = {}
    for variant in variants:
        reason = variant.unavailable(device)
        if reason is None and variant.kind == "compile" and not case.compile:
            reason = "compile not timed on this case in this run (see --help, --compile-all)"
        if reason is None and variant.table_only and case.targets is None:
            reason = "timed on the target table only"
        if reason is not None:
            skipped[variant.name] = reason
            continue
        record = records[variant.name] = base_record(case, variant, threads)
        try:
            module = variant.build(case, problem.params, device)
            with variant.pinned():
                first_ms, inputs, parity = first_call_with_parity(module, problem, reference, device)
            record.update(
                first_call_ms=first_ms,
                rel_err=parity.max_error,
                rel_errs=parity.errors,
                tolerance=parity.tolerance,
                grad_tolerance=parity.grad_tolerance,
                parity_ok=parity.ok,
            )
            if case.mode == "fwd+bwd":
                record["saved_bytes"] = saved_activation_bytes(module, inputs)
        except Exception as error:  # noqa: BLE001 - reported in the table and the exit status
            record.update(error=f"{type(error).__name__}: {error}", parity_ok=False)
            continue
        calls[variant.name] = functools.partial(pinned_step, variant, module, inputs, case.mode)
        if device.type == "cuda" and case.mode == "fwd" and case.batch * case.width <= CUDA_GRAPH_MAX_ELEMENTS:
            try:
                calls[variant.name] = cuda_graphed(calls[variant.name])
                record["cuda_graph"] = True
            except Exception as error:  # noqa: BLE001 - not every variant can be captured; time it plainly
                record["cuda_graph"] = f"not captured: {type(error).__name__}: {error}"

    times, errors = time_round_robin(calls, device=device, **timing) if calls else ({}, {})
    for name, message in errors.items():
        records[name].update(error=message, parity_ok=False)
    for name, ms in times.items():
        records[name].update(summarize(ms), repeats=len(ms))
        seconds = records[name]["median_ms"] / 1e3
        if case.flops is not None:
            records[name]["gflops"] = case.flops / seconds / 1e9
        if case.op in STACK_OPS:
            records[name]["rows_layers_per_s"] = case.batch * case.depth / seconds
        if records[name]["model_bytes_per_layer"] is not None:
            records[name]["model_gbps"] = records[name]["model_bytes_per_layer"] * case.depth / seconds / 1e9
    for record in records.values():
        record["one_flip_rel_err"] = one_flip_error(case)
    for record in records.values():
        for peer in PEERS:
            peer_median = records.get(peer, {}).get("median_ms")
            if peer_median is not None and record["median_ms"] is not None:
                record[f"ratio_vs_{peer}"] = peer_median / record["median_ms"]
    return list(records.values()), skipped


# ------------------------------------------------------------------------------------------------- main


# Inductor orders a graph's nodes by a recursive depth-first search: the training step of a
# 1024-layer stack nests deeper than Python's default limit of 1000 (RecursionError). Python 3.11
# keeps Python-to-Python calls off the C stack, so a higher limit is safe.
COMPILE_RECURSION_LIMIT = 100_000


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), COMPILE_RECURSION_LIMIT))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = runner_cases(quick=args.quick, compile_all=args.compile_all)
    if args.only is not None:
        cases = [case for case in cases if args.only in case.name]
    if args.list or not cases:
        for case in cases or runner_cases(quick=args.quick, compile_all=args.compile_all):
            compiled = "yes" if case.compile and not args.no_compile else "no"
            print(f"{case.name:<45} compile={compiled:<3} [{', '.join(case.tags)}]")
        if not cases:
            print(f"no case name contains {args.only!r}", file=sys.stderr)
            return 2
        return 0

    variants = [v for v in VARIANTS if not (v.kind == "compile" and args.no_compile)]
    compiling = any(v.kind == "compile" for v in variants) and any(case.compile for case in cases)
    machine = machine_info(device)
    machine["sgemm"] = matmul_gflops(device=device)
    machine["copy_gbps"] = copy_gbps(device) if device.type == "cuda" else None
    machine["run"] = {"quick": args.quick, "argv": sys.argv[1:], "timing": TIMING["quick" if args.quick else "full"]}
    temporary_cache = None
    if compiling:
        temporary_cache, machine["compile_warmup_s"] = prepare_compile()
        machine["compile_cache"] = "fresh temporary dir" if temporary_cache else "TORCHINDUCTOR_CACHE_DIR from env"
    print(header(machine, args), flush=True)

    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    timing = TIMING["quick" if args.quick else "full"]
    start = time.perf_counter()
    try:
        for case in tqdm(cases, desc="cases", unit="case", dynamic_ncols=True):
            case_records, case_skipped = run_case(case, variants, timing, device)
            tqdm.write("\n" + case_table(case, case_records, case_skipped, machine["copy_gbps"]))
            records.extend(case_records)
            skipped.extend({"case": case.name, "variant": name, "reason": why} for name, why in case_skipped.items())
            write_json(args.out, machine, records, skipped)
    finally:
        if temporary_cache is not None:
            shutil.rmtree(temporary_cache, ignore_errors=True)
    machine["wall_s"] = time.perf_counter() - start
    machine["loadavg_end"] = load_average()
    write_json(args.out, machine, records, skipped)

    for summary in (target_summary(records), checkpoint_summary(records)):
        if summary:
            print("\n" + summary)
    png = args.out.with_suffix(".png")
    plotted = plot(records, machine, png)
    print(f"\nwrote {args.out}" + (f" and {png}" if plotted else "") + f" ({machine['wall_s']:.0f} s)")

    failures = [r for r in records if not r["parity_ok"]]
    if failures:
        print(f"\n!!! {len(failures)} variant(s) FAILED parity or raised:", file=sys.stderr)
        for r in failures:
            what = r["error"] or f"rel_errs {r['rel_errs']} above tolerance"
            print(f"!!!   {r['case']} {r['variant']}: {what}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
