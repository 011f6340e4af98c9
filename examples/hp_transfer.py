"""Learning-rate transfer across depth (the paper's Figure 10 at small scale) or across width, on
scikit-learn's digits.

--sweep depth (default): for each parametrization (Depth-muP, standard, alpha=1/2 with gamma=0), each
depth and each learning rate on a log2 grid, trains a DepthMuPNet (width 128, block "post", relu, mean
subtraction, frozen input/output layers) with Adam.
--sweep width: the same net under Depth-muP at depth 64, widths 64..512, with the width rules of
param_groups (base_width 64) and without them (base_width = width).
--block mlp: the blocks are MLP blocks (ResidualMLPStack, hidden width 4 x width, relu, no MS), and the
depth sweep compares Depth-muP with CompleteP.

Each run trains for a fixed number of steps over several seeds and records the final training loss
(mean of the last 5 steps, averaged over seeds). Writes a PNG with one panel per setting (loss against
log2 lr, one curve per depth or width) and a JSON of all runs, and prints the best log2 lr per size.

    python examples/hp_transfer.py --quick                # about 1 minute on 2 cores
    python examples/hp_transfer.py                        # depths 2^3..2^8, about 15-25 minutes on 2 cores
    python examples/hp_transfer.py --sweep width          # widths 2^6..2^9 at depth 64, about 20 minutes
    python examples/hp_transfer.py --block mlp            # MLP blocks, Depth-muP against CompleteP
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

import dmup_kernels as dk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARAMETRIZATIONS, digits, make_net, train  # noqa: E402

WIDTH_SWEEP_DEPTH = 64
WIDTH_SWEEP_BASE = 64
WIDTH_SETTINGS: dict[str, dict] = {
    f"Depth-muP + width rules (base width {WIDTH_SWEEP_BASE})": {"base_width": WIDTH_SWEEP_BASE},
    "Depth-muP, no width rules": {},
}
"""The settings of --sweep width: keyword arguments of make_net beside the width."""
MLP_PARAMETRIZATIONS: dict[str, dk.DepthParametrization] = {
    "Depth-muP (alpha=1/2, gamma=1/2)": dk.DEPTH_MUP,
    "CompleteP (alpha=1, gamma=0)": dk.COMPLETE_P,
}
"""The parametrizations of the depth sweep with --block mlp."""
MLP_HIDDEN_RATIO = 4
"""Hidden width of an MLP block over the stream width (a transformer's 4n)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=("depth", "width"), default="depth", help="what varies (default depth)")
    parser.add_argument("--block", choices=("linear", "mlp"), default="linear", help="block depth 1 or 2 (MLP)")
    parser.add_argument("--quick", action="store_true", help="3 sizes, 7 learning rates, 1 seed, 40 steps")
    parser.add_argument("--depths", type=int, nargs="+", help="default 8 16 32 64 128 256 (quick: 8 16 32)")
    parser.add_argument("--widths", type=int, nargs="+", help="default 64 128 256 512 (quick: 64 128 256)")
    parser.add_argument("--log2-lrs", type=float, nargs="+", help="default -10..-2 (quick: -9..-3)")
    parser.add_argument("--seeds", type=int, help="default 2 (quick: 1)")
    parser.add_argument("--steps", type=int, help="default 100 (quick: 40)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--out", type=Path, help="output stem: <out>.json, <out>.png (default hp_transfer[_width][_mlp])"
    )
    args = parser.parse_args(argv)
    args.depths = args.depths or ([8, 16, 32] if args.quick else [8, 16, 32, 64, 128, 256])
    args.widths = args.widths or ([64, 128, 256] if args.quick else [64, 128, 256, 512])
    args.log2_lrs = args.log2_lrs or [float(v) for v in (range(-9, -2) if args.quick else range(-10, -1))]
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.steps = args.steps or (40 if args.quick else 100)
    args.out = args.out or Path(
        "hp_transfer" + ("_width" if args.sweep == "width" else "") + ("_mlp" if args.block == "mlp" else "")
    )
    return args


def sweep(args: argparse.Namespace) -> tuple[dict[str, dict], list[int]]:
    """The settings (name -> make_net keyword arguments) and the sizes of the sweep."""
    if args.sweep == "depth":
        parametrizations = MLP_PARAMETRIZATIONS if args.block == "mlp" else PARAMETRIZATIONS
        return {name: {"parametrization": p} for name, p in parametrizations.items()}, args.depths
    return {name: {"parametrization": dk.DEPTH_MUP, **kwargs} for name, kwargs in WIDTH_SETTINGS.items()}, args.widths


def build(args: argparse.Namespace, size: int, setting: dict) -> dk.DepthMuPNet:
    depth, width = (size, 128) if args.sweep == "depth" else (WIDTH_SWEEP_DEPTH, size)
    hidden_width = MLP_HIDDEN_RATIO * width if args.block == "mlp" else None
    return make_net(depth, width=width, hidden_width=hidden_width, **setting)


def final_loss(losses: list[float]) -> float:
    tail = losses[-5:]
    return math.inf if any(not math.isfinite(v) for v in tail) else sum(tail) / len(tail)


def best_log2_lrs(runs: list[dict]) -> dict[str, dict[int, float | None]]:
    """For each setting and size, the log2 lr with the lowest seed-averaged final loss."""
    best: dict[str, dict[int, float | None]] = {}
    for run in runs:
        table = best.setdefault(run["setting"], {})
        current = table.get(run["size"])
        loss = run["loss"]
        if math.isfinite(loss) and (current is None or loss < current[1]):
            table[run["size"]] = (run["log2_lr"], loss)
        else:
            table.setdefault(run["size"], current)
    return {name: {size: (v[0] if v else None) for size, v in table.items()} for name, table in best.items()}


def plot(runs: list[dict], path: Path, size_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(run["setting"] for run in runs))
    label = {"depth": "L", "width": "n"}[size_name]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False, sharey=True)
    for axis, name in zip(axes[0], names):
        for size in sorted({run["size"] for run in runs}):
            points = sorted((r["log2_lr"], r["loss"]) for r in runs if r["setting"] == name and r["size"] == size)
            axis.plot([p[0] for p in points], [min(p[1], 10.0) for p in points], marker="o", label=f"{label} = {size}")
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
    settings, sizes = sweep(args)
    jobs = [(name, size, log2_lr) for name in settings for size in sizes for log2_lr in args.log2_lrs]
    runs = []
    start = time.perf_counter()
    for name, size, log2_lr in tqdm(jobs, desc="runs", unit="run"):
        losses = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            net = build(args, size, settings[name])
            losses.append(final_loss(train(net, data, lr=2.0**log2_lr, steps=args.steps, batch=args.batch, seed=seed)))
        runs.append({"setting": name, "size": size, args.sweep: size, "log2_lr": log2_lr,
                     "loss": sum(losses) / len(losses), "seed_losses": losses})  # fmt: skip
    best = best_log2_lrs(runs)
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "runs": runs, "best_log2_lr": best, "seconds": time.perf_counter() - start}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=1, default=lambda v: None if v == math.inf else v))
    plot(runs, png_path, args.sweep)
    label = {"depth": "L=", "width": "n="}[args.sweep]
    print(f"\nbest log2 lr per {args.sweep} (final training loss after {args.steps} steps, {args.seeds} seed(s)):")
    print(f"{'setting':<44}" + "".join(f"{label + str(size):>8}" for size in sizes))
    for name, table in best.items():
        cells = "".join(f"{'-' if table.get(size) is None else format(table[size], 'g'):>8}" for size in sizes)
        print(f"{name:<44}{cells}")
    print(f"\nwrote {json_path} and {png_path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
