"""Learning-rate transfer across depth, the paper's Figure 10 at small scale, on scikit-learn's digits.

For each parametrization (Depth-muP, standard, alpha=1/2 with gamma=0), each depth and each learning
rate on a log2 grid, trains a DepthMuPNet (width 128, block "post", relu, mean subtraction, frozen
input/output layers) with Adam for a fixed number of steps over several seeds, and records the final
training loss (mean of the last 5 steps, averaged over seeds). Writes a PNG with one panel per
parametrization (loss against log2 lr, one curve per depth) and a JSON of all runs, and prints the
best log2 lr per depth.

    python examples/hp_transfer.py --quick      # about 1 minute on 2 cores
    python examples/hp_transfer.py              # depths 2^3..2^8, about 15-25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARAMETRIZATIONS, digits, make_net, train  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="depths 2^3..2^5, 7 learning rates, 1 seed, 40 steps")
    parser.add_argument("--depths", type=int, nargs="+", help="default 8 16 32 64 128 256 (quick: 8 16 32)")
    parser.add_argument("--log2-lrs", type=float, nargs="+", help="default -10..-2 (quick: -9..-3)")
    parser.add_argument("--seeds", type=int, help="default 2 (quick: 1)")
    parser.add_argument("--steps", type=int, help="default 100 (quick: 40)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("hp_transfer"), help="output stem: <out>.json, <out>.png")
    args = parser.parse_args(argv)
    args.depths = args.depths or ([8, 16, 32] if args.quick else [8, 16, 32, 64, 128, 256])
    args.log2_lrs = args.log2_lrs or [float(v) for v in (range(-9, -2) if args.quick else range(-10, -1))]
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.steps = args.steps or (40 if args.quick else 100)
    return args


def final_loss(losses: list[float]) -> float:
    tail = losses[-5:]
    return math.inf if any(not math.isfinite(v) for v in tail) else sum(tail) / len(tail)


def best_log2_lrs(runs: list[dict]) -> dict[str, dict[int, float | None]]:
    """For each parametrization and depth, the log2 lr with the lowest seed-averaged final loss."""
    best: dict[str, dict[int, float | None]] = {}
    for run in runs:
        table = best.setdefault(run["parametrization"], {})
        current = table.get(run["depth"])
        loss = run["loss"]
        if math.isfinite(loss) and (current is None or loss < current[1]):
            table[run["depth"]] = (run["log2_lr"], loss)
        else:
            table.setdefault(run["depth"], current)
    return {name: {depth: (v[0] if v else None) for depth, v in table.items()} for name, table in best.items()}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(run["parametrization"] for run in runs))
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False, sharey=True)
    for axis, name in zip(axes[0], names):
        for depth in sorted({run["depth"] for run in runs}):
            points = sorted(
                (r["log2_lr"], r["loss"]) for r in runs if r["parametrization"] == name and r["depth"] == depth
            )
            axis.plot([p[0] for p in points], [min(p[1], 10.0) for p in points], marker="o", label=f"L = {depth}")
        axis.set_title(name)
        axis.set_xlabel("log2 learning rate")
        axis.set_yscale("log")
    axes[0][0].set_ylabel("training loss at the end (capped at 10)")
    axes[0][-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = digits()
    jobs = [(name, depth, log2_lr) for name in PARAMETRIZATIONS for depth in args.depths for log2_lr in args.log2_lrs]
    runs = []
    start = time.perf_counter()
    for name, depth, log2_lr in tqdm(jobs, desc="runs", unit="run"):
        losses = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            net = make_net(depth, PARAMETRIZATIONS[name])
            losses.append(final_loss(train(net, data, lr=2.0**log2_lr, steps=args.steps, batch=args.batch, seed=seed)))
        runs.append({"parametrization": name, "depth": depth, "log2_lr": log2_lr, "loss": sum(losses) / len(losses),
                     "seed_losses": losses})  # fmt: skip
    best = best_log2_lrs(runs)
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "runs": runs, "best_log2_lr": best, "seconds": time.perf_counter() - start}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=1, default=lambda v: None if v == math.inf else v))
    plot(runs, png_path)
    print(f"\nbest log2 lr per depth (final training loss after {args.steps} steps, {args.seeds} seed(s)):")
    print(f"{'parametrization':<36}" + "".join(f"{'L=' + str(d):>8}" for d in args.depths))
    for name, table in best.items():
        cells = "".join(f"{'-' if table.get(d) is None else format(table[d], 'g'):>8}" for d in args.depths)
        print(f"{name:<36}{cells}")
    print(f"\nwrote {json_path} and {png_path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
