"""Smoke runs of the examples' code paths on tiny settings (the experiments themselves are not tests)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the examples train on scikit-learn's digits")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import depth_limit  # noqa: E402
import hp_transfer  # noqa: E402


def test_hp_transfer_writes_runs_plot_and_best_lrs(tmp_path, capsys):
    out = tmp_path / "hp"
    result = hp_transfer.main(["--depths", "4", "8", "--log2-lrs", "-8", "-5", "--steps", "6", "--seeds", "1",
                               "--batch", "32", "--out", str(out)])  # fmt: skip
    assert len(result["runs"]) == 3 * 2 * 2  # parametrizations x depths x learning rates
    assert all(math.isfinite(run["loss"]) and run["loss"] > 0 for run in result["runs"])
    stored = json.loads(out.with_suffix(".json").read_text())
    assert stored["best_log2_lr"].keys() == result["best_log2_lr"].keys()
    for table in result["best_log2_lr"].values():
        assert set(table) == {4, 8} and all(v in (-8.0, -5.0) for v in table.values())
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "best log2 lr per depth" in capsys.readouterr().out


def test_best_log2_lr_picks_the_lowest_finite_loss():
    runs = [
        {"parametrization": "p", "depth": 8, "log2_lr": -6.0, "loss": 0.5},
        {"parametrization": "p", "depth": 8, "log2_lr": -5.0, "loss": 0.2},
        {"parametrization": "p", "depth": 8, "log2_lr": -4.0, "loss": math.inf},
        {"parametrization": "p", "depth": 16, "log2_lr": -4.0, "loss": math.inf},
    ]
    assert hp_transfer.best_log2_lrs(runs) == {"p": {8: -5.0, 16: None}}


def test_depth_limit_reports_alignment_of_consecutive_depths(tmp_path):
    result = depth_limit.main(["--depths", "4", "8", "--steps", "5", "--out", str(tmp_path / "dl.json")])
    for rows in result["alignment"].values():
        assert [row["depths"] for row in rows] == [[4, 8]]
        assert 0.0 <= rows[0]["mutual_knn"] <= 1.0 and 0.0 < rows[0]["cka"] <= 1.0 + 1e-9
    assert json.loads((tmp_path / "dl.json").read_text())["alignment"] == result["alignment"]
    assert (tmp_path / "dl.png").read_bytes()[:4] == b"\x89PNG"
