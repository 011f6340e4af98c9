"""Does the network approach a limit as depth grows? Trains nets at depths 2^3..2^8 with the same
data order and the same frozen input/output layers, then compares the final features (the stack's
output on 512 digits) of consecutive depths with mutual_knn (k = 10) and linear CKA. Under Depth-muP
the alignment should rise toward 1 with depth; the same is reported for standard parametrization.
Writes <out> (JSON) and, next to it, a plot of both measures against depth (<out> with suffix .png).

    python examples/depth_limit.py --quick      # depths 8 16 32, 30 steps, about 20 s on 2 cores
    python examples/depth_limit.py              # depths 8..256, 100 steps, a few minutes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARAMETRIZATIONS, digits, make_net, train  # noqa: E402

from dmup_kernels.diagnostics import cka, mutual_knn  # noqa: E402

# Learning rates near each parametrization's optimum in `hp_transfer.py --quick` (log2 -5 and -9).
LEARNING_RATES = {"Depth-muP (alpha=1/2, gamma=1/2)": 2.0**-5, "standard (alpha=0, gamma=0)": 2.0**-9}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depths", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", type=Path, default=Path("depth_limit.json"))
    args = parser.parse_args(argv)
    args.depths = args.depths or ([8, 16, 32] if args.quick else [8, 16, 32, 64, 128, 256])
    args.steps = args.steps or (30 if args.quick else 100)
    return args


def plot(alignment: dict[str, list[dict]], path: Path) -> None:
    """mutual_knn and CKA of each pair of consecutive depths against the deeper one (log2 axis), one
    panel per measure, one line per parametrization; diverged pairs are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for axis, measure in zip(axes[0], ("mutual_knn", "cka")):
        for name, rows in alignment.items():
            points = [(row["depths"][1], row[measure]) for row in rows if row[measure] is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("depth L (compared with L/2)")
        axis.set_ylabel(measure)
        axis.set_ylim(0.0, 1.02)
        axis.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = digits()
    probe = data[0][:512]
    torch.manual_seed(0)
    frozen = make_net(1, PARAMETRIZATIONS["Depth-muP (alpha=1/2, gamma=1/2)"])  # the shared input/output layers
    result: dict = {"settings": {"depths": args.depths, "steps": args.steps}, "alignment": {}}
    for name, lr in LEARNING_RATES.items():
        features = {}
        for depth in tqdm(args.depths, desc=name, unit="depth"):
            torch.manual_seed(1)
            net = make_net(depth, PARAMETRIZATIONS[name])
            net.input.load_state_dict(frozen.input.state_dict())
            net.output.load_state_dict(frozen.output.state_dict())
            train(net, data, lr=lr, steps=args.steps, batch=128, seed=0)
            with torch.no_grad():
                features[depth] = net.stack(net.input(probe))
        rows = []
        for shallow, deep in zip(args.depths, args.depths[1:]):
            a, b = features[shallow], features[deep]
            finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
            rows.append({"depths": [shallow, deep], "mutual_knn": mutual_knn(a, b, k=10) if finite else None,
                         "cka": cka(a, b) if finite else None})  # fmt: skip
        result["alignment"][name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    png_path = args.out.with_suffix(".png")
    plot(result["alignment"], png_path)
    print(f"\nalignment of the final features of consecutive depths ({args.steps} steps of Adam):")
    for name, rows in result["alignment"].items():
        print(name)
        for row in rows:
            knn, ck = row["mutual_knn"], row["cka"]
            cells = "diverged" if knn is None else f"mutual_knn {knn:.3f}   cka {ck:.3f}"
            print(f"  L = {row['depths'][0]:>3} vs {row['depths'][1]:>3}:  {cells}")
    print(f"\nwrote {args.out} and {png_path}")
    return result


if __name__ == "__main__":
    main()
