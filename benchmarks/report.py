"""The benchmark report: a table per case, the target table, the header that states the machine, the
plot of throughput against depth, and the JSON file (benchmarks/run.py measures, this module writes);
and the checkpoint sweep's table and plot (benchmarks/checkpoint_sweep.py measures).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .cases import CHECKPOINT_COST_TARGET, Case
from .measure import one_flip_error
from .traffic import VARIANT_MODELS, layer_shape, model_bytes_per_layer
from .variants import CHECKPOINT_VARIANT, PEERS, SAVE_ALL_PEERS

BUSY_LOAD_FRACTION = 0.5
"""The header warns that timings will be noisy when the 1-minute load average at start exceeds this
fraction of the logical CPUs (other processes are then using the cores the benchmark times)."""


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


COLUMNS = (  # header, width
    ("variant", 9), ("mode", 8), ("median ms", 10), ("min ms", 10), ("max ms", 10), ("x eager", 8),
    ("x compile", 9), ("rel_err", 13), ("GFLOP/s", 8), ("first ms", 10), ("saved", 10),
)  # fmt: skip


def row(cells: list[str]) -> str:
    """One table line: the first two columns left-aligned, the others right-aligned."""
    widths = [width for _, width in COLUMNS]
    return "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def case_table(
    case: Case, records: list[dict[str, Any]], skipped: dict[str, str], copy_bandwidth: float | None = None
) -> str:
    """The printed table of one case, with parity failures and errors spelt out below it."""
    repeats = max((r["repeats"] for r in records), default=0)
    flavour = f"{case.activation}, block {case.block}, MS {'on' if case.mean_subtract else 'off'}"
    title = f"== {case.name}  [{', '.join(case.tags)}]  {flavour}, {case.dtype_name}, {repeats} repeats"
    if case.targets is not None:
        title += f"; target >= {case.targets[0]:g}x eager, >= {case.targets[1]:g}x compile"
    lines = [title, row([header for header, _ in COLUMNS])]
    notes = []
    for r in records:
        if r["error"] is not None and r["median_ms"] is None:
            lines.append(f"{r['variant']:<9}  {r['mode']:<8}  ERROR (see below)")
            notes.append(f"!!! ERROR {r['variant']}: {r['error']}")
            continue
        rel = fmt(r["rel_err"], ".1e") + ("" if r["parity_ok"] else " FAIL")
        cells = [
            r["variant"], r["mode"], fmt(r["median_ms"], ".3f"), fmt(r["min_ms"], ".3f"), fmt(r["max_ms"], ".3f"),
            fmt(r["ratio_vs_eager"], ".2f", "x"), fmt(r["ratio_vs_compile"], ".2f", "x"), rel,
            fmt(r["gflops"], ".1f"), fmt(r["first_call_ms"], ".1f"), format_bytes(r["saved_bytes"]),
        ]  # fmt: skip
        lines.append(row(cells))
        if r["error"] is not None:
            notes.append(f"!!! ERROR {r['variant']} while timing: {r['error']}")
        if r["rel_errs"] is not None and not r["parity_ok"]:
            detail = " ".join(f"{k}={v:.2e}" for k, v in r["rel_errs"].items())
            notes.append(
                f"!!! PARITY FAILURE {r['variant']}: {detail} "
                f"(tolerance {r['tolerance']:.0e}, gradients {r['grad_tolerance']:.0e})"
            )
    flip = one_flip_error(case)
    grads_only = [
        r for r in records if r["rel_errs"] and not r["parity_ok"] and r["rel_errs"].get("out", 0) <= r["tolerance"]
    ]
    if flip is not None and grads_only:
        eager = next((r for r in records if r["variant"] == "eager" and r["rel_err"] is not None), None)
        notes.append(
            f"    note: only gradients fail. {case.activation}'s derivative jumps at 0, so one pre-activation that "
            f"rounds to the other side of 0 moves the gradients by ~{flip:.0e} (s/sqrt(B*n)) on this shape"
            + (f"; eager float32 on the same inputs: {eager['rel_err']:.1e}" if eager else "")
        )
    for name, reason in skipped.items():
        lines.append(f"{name:<9}  {case.mode:<8}  skipped: {reason}")
    traffic = traffic_line(case, copy_bandwidth, records)
    return "\n".join(lines + notes + ([traffic] if traffic else []))


def traffic_line(case: Case, copy_bandwidth: float | None, records: list[dict[str, Any]] = ()) -> str | None:
    """DRAM bytes per layer of eager and of each GPU kernel (the traffic model), with the bandwidth the
    model implies at the measured times when on a GPU."""
    by_variant = {r["variant"]: r for r in records}
    parts = []
    for name, model in VARIANT_MODELS.items():
        nbytes = model_bytes_per_layer(case, name)
        if nbytes is None:
            return None
        kernel = model(layer_shape(case))
        part = f"{name}{'' if kernel == name else f' ({kernel})'} {nbytes / 2**20:.3f} MiB"
        gbps = by_variant.get(name, {}).get("model_gbps")
        if gbps is not None and copy_bandwidth:
            part += f" = {gbps:.0f} GB/s ({gbps / copy_bandwidth:.0%} of copy)"
        parts.append(part)
    return "    DRAM traffic model per layer: " + "; ".join(parts)


def header(machine: dict[str, Any], args: argparse.Namespace) -> str:
    sgemm = machine["sgemm"]
    lines = [
        f"dmup_kernels benchmarks ({'quick' if args.quick else 'full'} run), dtype float32, device {machine['device']}",
        f"machine: {machine['cpu_model']} ({machine['logical_cpus']} logical CPUs, {machine['cpu_capability']}), "
        f"threads {machine['threads']}",
        f"software: torch {machine['torch']}, python {machine['python']}, dmup_kernels C++ "
        f"{'built' if machine['dmup_kernels_cpp'] else 'NOT built'}, commit {str(machine['git_commit'])[:12]}",
        f"dmup_kernels CPU instruction set: {machine['dmup_cpu_isa']} for cpp (this CPU runs "
        f"{', '.join(machine['dmup_runnable_cpu_isas']) or 'none'}); float64 runs the portable kernel",
        f"ceiling: {sgemm['size']}x{sgemm['size']} float32 matmul {sgemm['median_gflops']:.1f} GFLOP/s "
        f"(median; best {sgemm['best_gflops']:.1f})"
        + (f"; copy bandwidth {machine['copy_gbps']:.0f} GB/s" if machine.get("copy_gbps") else ""),
    ]
    load = machine.get("loadavg_start")
    if load is not None:
        busy = load[0] > BUSY_LOAD_FRACTION * (machine["logical_cpus"] or 1)
        lines.append(
            f"load average before start: {load[0]:.2f} (1 min)"
            + ("  !!! other processes are running: timings will be noisy" if busy else "")
        )
    if machine.get("compile_warmup_s") is not None:
        lines.append(
            f"torch.compile: cold caches ({machine['compile_cache']}); start-up warm-up "
            f"{machine['compile_warmup_s']:.1f} s, not charged to any case"
        )
    return "\n".join(lines)


def target_summary(records: list[dict[str, Any]]) -> str:
    """The target rows: each backend's speed-ups next to the targets (reported, never asserted)."""
    rows = [
        r
        for r in records
        if r["targets"] is not None and r["variant"] not in PEERS and r["variant"] != CHECKPOINT_VARIANT.name
    ]
    if not rows:
        return ""
    lines = ["== target table (training step; m: the hidden width of an MLP stack): speed-up of each backend vs its "
             "targets"]  # fmt: skip
    lines.append(f"{'variant':<9}  {'n':>4}  {'m':>4}  {'B':>4}  {'L':>5}  {'median ms':>10}  "
                 f"{'x eager (target)':>18}  {'x compile (target)':>19}  verdict")  # fmt: skip
    for r in rows:
        verdicts = []
        for peer, key in (("eager", "vs_eager"), ("compile", "vs_compile")):
            ratio = r[f"ratio_vs_{peer}"]
            if ratio is None:
                verdicts.append(f"{peer}: not timed")
            elif ratio < r["targets"][key]:
                verdicts.append(f"{peer}: MISSED")
        verdict = "; ".join(verdicts) or "met"
        if not r["parity_ok"]:
            verdict = "PARITY FAIL; " + verdict
        lines.append(
            f"{r['variant']:<9}  {r['width']:>4}  {r['hidden_width'] or '-':>4}  {r['batch']:>4}  {r['depth']:>5}  "
            f"{fmt(r['median_ms'], '10.3f')}  "
            f"{fmt(r['ratio_vs_eager'], '.2f', 'x'):>9} ({r['targets']['vs_eager']:>4g}x)  "
            f"{fmt(r['ratio_vs_compile'], '.2f', 'x'):>10} ({r['targets']['vs_compile']:>4g}x)  {verdict}"
        )
    return "\n".join(lines)


def checkpoint_summary(records: list[dict[str, Any]]) -> str:
    """Per target row, the training step with checkpoints (CHECKPOINT_VARIANT) over saving every layer
    (its backend), in one run, against CHECKPOINT_COST_TARGET (reported, never asserted)."""
    medians = {(r["case"], r["variant"]): r["median_ms"] for r in records if r["targets"] is not None}
    lines = []
    for r in records:
        if r["variant"] != CHECKPOINT_VARIANT.name or r["median_ms"] is None:
            continue
        save_all = medians.get((r["case"], CHECKPOINT_VARIANT.backend))
        if save_all is None:
            continue
        cost = r["median_ms"] / save_all
        verdict = "met" if cost <= CHECKPOINT_COST_TARGET else "MISSED"
        lines.append(
            f"{r['width']:>4}  {r['hidden_width'] or '-':>4}  {r['batch']:>4}  {r['depth']:>5}  {save_all:>10.3f}  "
            f"{r['median_ms']:>10.3f}  "
            f"{cost:>6.2f}x  {verdict}"
        )
    if not lines:
        return ""
    title = (
        f"== depth checkpoints: {CHECKPOINT_VARIANT.name} ({CHECKPOINT_VARIANT.backend}, checkpoint="
        f"{CHECKPOINT_VARIANT.checkpoint!r}) vs {CHECKPOINT_VARIANT.backend}, target <= {CHECKPOINT_COST_TARGET:g}x"
    )
    header_line = f"{'n':>4}  {'m':>4}  {'B':>4}  {'L':>5}  {'save-all ms':>10}  {'ckpt ms':>10}  {'cost':>7}  verdict"
    return "\n".join([title, header_line, *lines])


def plot(records: list[dict[str, Any]], machine: dict[str, Any], path: Path) -> bool:
    """GFLOP/s vs depth (log2 x axis), one panel per (op, width, hidden width, batch, mode), one line per variant,
    with the matmul ceiling dashed. Panels with a single depth are left out unless no panel has more.
    Returns False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int, int, int, str], dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        if r["gflops"] is not None:
            key = (r["op"], r["width"], r["hidden_width"], r["batch"], r["mode"])
            groups.setdefault(key, {}).setdefault(r["variant"], []).append((r["depth"], r["gflops"]))
    swept = {k: v for k, v in groups.items() if len({d for pts in v.values() for d, _ in pts}) > 1}
    groups = dict(sorted((swept or groups).items()))
    if not groups:
        return False
    columns = min(2, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.2 * rows), squeeze=False)
    ceiling = machine["sgemm"]["median_gflops"]
    for ax, ((op, width, hidden_width, batch, mode), lines) in zip(axes.flat, groups.items()):
        for variant, points in lines.items():
            points.sort()
            ax.plot([d for d, _ in points], [g for _, g in points], marker="o", label=variant)
        ax.axhline(ceiling, linestyle="--", color="gray", label=f"{machine['sgemm']['size']}² sgemm")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("depth L")
        ax.set_ylabel("GFLOP/s (2·B·n² per GEMM, 2·B·n·m for an MLP block's)")
        ax.set_title(f"{op}, n={width}" + (f", m={hidden_width}" if hidden_width else "") + f", B={batch}, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"dmup_kernels stack throughput: {machine['cpu_model']}, {machine['threads']} threads, "
        f"torch {machine['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


GIB = 2**30


def checkpoint_sweep_table(records: list[dict[str, Any]], skipped: list[dict[str, Any]], variants: list[str]) -> str:
    """The checkpoint sweep as a markdown table, a row per depth: for each of ``variants`` the median time
    per step in seconds and the peak GiB (above the process's resident size before the problem was
    built), or "needs X GiB" for a point not run for lack of memory; then, for each checkpointing variant
    and its save-all peer (``SAVE_ALL_PEERS``) both in ``variants``, the ratio of their step times.
    Calibration points are left out; errors and other reasons for not running are spelt out below."""
    measured = {(r["variant"], r["depth"]): r for r in records if not r["calibration"]}
    not_run = {(s["variant"], s["depth"]): s for s in skipped}
    depths = sorted({depth for _, depth in measured} | {depth for _, depth in not_run})
    ratios = [(name, peer) for name, peer in SAVE_ALL_PEERS.items() if name in variants and peer in variants]
    head = ["L"] + [f"{name} {unit}" for name in variants for unit in ("s/step", "peak GiB")]
    head += [f"{name} / {peer}" for name, peer in ratios]
    lines = [
        "== checkpoint sweep: time per training step (median, s) and peak memory (GiB above the process "
        "before the problem was built)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    notes: dict[str, None] = {}  # ordered, each note once
    for depth in depths:
        cells = [str(depth)]
        for name in variants:
            record, skip = measured.get((name, depth)), not_run.get((name, depth))
            if record is not None and record["median_ms"] is not None:
                cells += [f"{record['median_ms'] / 1e3:.2f}", f"{record['peak_bytes'] / GIB:.2f}"]
            elif record is not None:
                cells += ["ERROR", "-"]
                notes[f"!!! ERROR {name} L={depth}: {record['error']}"] = None
            elif skip is not None and skip["needs_bytes"] is not None:
                cells += ["-", f"needs {skip['needs_bytes'] / GIB:.1f} GiB"]
            elif skip is not None:
                cells += ["-", "not run"]
                notes[f"{name} not run: {skip['reason']}"] = None
            else:
                cells += ["-", "-"]
        for name, peer in ratios:
            times = [measured.get((variant, depth), {}).get("median_ms") for variant in (name, peer)]
            cells.append("-" if None in times else f"{times[0] / times[1]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + list(notes))


def plot_checkpoint_sweep(
    records: list[dict[str, Any]], skipped: list[dict[str, Any]], machine: dict[str, Any], path: Path
) -> bool:
    """Two panels against depth (log2 x axis), one line per variant: peak memory (GiB above the process
    before the problem was built; the estimates of points not run for lack of memory dotted, hollow
    markers; MemAvailable at the start dashed) and median time per training step. Calibration points
    are left out. Returns False when no point was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    measured = [r for r in records if not r["calibration"] and r["median_ms"] is not None]
    if not measured:
        return False
    fig, (memory_ax, time_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    for index, name in enumerate(machine["run"]["variants"]):
        color = f"C{index}"  # one colour per variant in both panels, whichever of its points exist
        points = sorted((r["depth"], r["peak_bytes"], r["median_ms"] / 1e3) for r in measured if r["variant"] == name)
        if points:
            depths, peaks, seconds = zip(*points)
            memory_ax.plot(depths, [nbytes / GIB for nbytes in peaks], marker="o", color=color, label=name)
            time_ax.plot(depths, seconds, marker="o", color=color, label=name)
        needs = sorted((s["depth"], s["needs_bytes"]) for s in skipped if s["variant"] == name and s["needs_bytes"])
        if needs:
            estimates = points[-1:] + needs  # the dotted line starts at the deepest measured point
            memory_ax.plot(
                [point[0] for point in estimates],
                [point[1] / GIB for point in estimates],
                linestyle=":",
                marker="o",
                markerfacecolor="none",
                color=color,
                label=f"{name}: estimate, not run",
            )
    memory_ax.axhline(machine["mem_available_start"] / GIB, linestyle="--", color="gray", label="MemAvailable at start")
    memory_ax.set_ylabel("peak memory, GiB")
    time_ax.set_ylabel("time per training step, s (median)")
    for ax in (memory_ax, time_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))  # 0.1 1 10, not 10^k
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(minor_thresholds=(2, 0.5)))  # 2 3 5 on short ranges
        ax.set_xlabel("depth L")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    case = measured[0]
    fig.suptitle(
        f"ResidualStack training step, n={case['width']}, B={case['batch']}, {case['dtype']}: "
        f"{machine['cpu_model']}, {machine['threads']} threads, torch {machine['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float written as the string "inf"/"-inf"/"nan" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def write_json(
    path: Path, machine: dict[str, Any], records: list[dict[str, Any]], skipped: list[dict[str, Any]]
) -> None:
    """Writes {"machine", "records", "skipped"} atomically (after every case, so a stopped run keeps its results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    document = finite_json({"machine": machine, "records": records, "skipped": skipped})
    temporary.write_text(json.dumps(document, indent=1, allow_nan=False))
    temporary.replace(path)
