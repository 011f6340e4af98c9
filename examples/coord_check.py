"""Coord check across width and depth: the magnitudes of the residual stream and the output after a few
Adam steps on scikit-learn's digits, under the default parametrization (Depth-muP with the width rules
of param_groups, base width 64), without the width rules (Depth-muP only), and under the standard
parametrization (no depth or width scaling).

Widths 64..1024 at depth 64 and depths 8..512 at width 128. Under the default parametrization the
values stay flat in both; without the width rules they grow with width, and the standard
parametrization also grows with depth (points that overflow to inf or NaN are left out). Writes a PNG
(rows: parametrization; columns: against width, against depth) and a JSON of the coord_check tables.

    python examples/coord_check.py      # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import dmup_kernels as dk
from dmup_kernels import diagnostics as dg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import digits  # noqa: E402

BASE_WIDTH = 64
SETTINGS: dict[str, dict] = {
    f"default (Depth-muP, width rules from base width {BASE_WIDTH})": {
        "parametrization": dk.DEPTH_MUP,
        "base_width": BASE_WIDTH,
    },
    "no width rules (Depth-muP only)": {"parametrization": dk.DEPTH_MUP},
    "standard (no depth or width scaling)": {"parametrization": dk.STANDARD},
}
PLACES = ("1", "output")  # the stream at the end of the stack, and the network's output


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--width-sweep-depth", type=int, default=64)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--depth-sweep-width", type=int, default=128)
    parser.add_argument("--adam-steps", type=int, default=5, help="Adam steps before the values are read")
    parser.add_argument("--lr", type=float, default=2.0**-7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("coord_check"), help="output stem: <out>.json, <out>.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    inputs, targets = digits()
    data = inputs[: args.batch], targets[: args.batch]
    tables: dict[str, dict[str, list]] = {}
    for name, setting in SETTINGS.items():

        def make(depth: int, width: int, setting: dict = setting) -> dk.DepthMuPNet:
            return dk.DepthMuPNet(inputs.shape[1], width, depth, 10, **setting)

        tables[name] = {
            "width": dg.coord_check(
                make, [args.width_sweep_depth], data, widths=args.widths, steps=args.adam_steps + 1, lr=args.lr
            ),
            "depth": dg.coord_check(
                make, args.depths, data, widths=[args.depth_sweep_width], steps=args.adam_steps + 1, lr=args.lr
            ),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "tables": tables}))
    plot(tables, args, png_path)
    last = args.adam_steps  # coord_check records before each step: row adam_steps follows that many
    for name, sweeps in tables.items():
        for against, table in sweeps.items():
            values = {
                place: [r["mean_abs"] for r in table if r["step"] == last and r["place"] == place] for place in PLACES
            }
            spread = {place: max(v) / min(v) if all(map(math.isfinite, v)) else math.inf for place, v in values.items()}
            print(
                f"{name}, against {against}: max/min over sizes " + ", ".join(f"{p} {s:.2f}" for p, s in spread.items())
            )
    print(f"wrote {json_path} and {png_path}")
    return tables


def plot(tables: dict[str, dict[str, list]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = args.adam_steps
    figure, axes = plt.subplots(len(tables), 2, figsize=(10, 3.4 * len(tables)), sharey="row", squeeze=False)
    for row, (name, sweeps) in enumerate(tables.items()):
        for column, against in enumerate(("width", "depth")):
            axis = axes[row][column]
            for place in PLACES:
                points = sorted(
                    (r[against], r["mean_abs"])
                    for r in sweeps[against]
                    if r["step"] == last and r["place"] == place and math.isfinite(r["mean_abs"])
                )
                label = "stream at the end of the stack" if place == "1" else "output"
                axis.plot([math.log2(x) for x, _ in points], [v for _, v in points], marker="o", label=label)
            fixed = f"depth {args.width_sweep_depth}" if against == "width" else f"width {args.depth_sweep_width}"
            axis.set_title(f"{name}\n{fixed}, after {args.adam_steps} Adam steps", fontsize="small")
            axis.set_xlabel(f"log2 {against}")
            axis.set_yscale("log")
        axes[row][0].set_ylabel("mean |x|")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
