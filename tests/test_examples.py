"""Smoke runs of the examples' code paths on tiny settings (the experiments themselves are not tests)."""

from __future__ import annotations

import json
import math
import sys

import pytest

import dmup_kernels

from conftest import REPO

pytest.importorskip("sklearn", reason="the examples train on scikit-learn's digits")
sys.path.insert(0, str(REPO / "examples"))

import coord_check  # noqa: E402
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


def test_hp_transfer_width_sweep_applies_the_width_rules(tmp_path, capsys, monkeypatch):
    """--sweep width trains at each width with and without base_width (the width rules of param_groups)."""
    monkeypatch.setattr(hp_transfer, "WIDTH_SWEEP_DEPTH", 2)
    built = []
    make = hp_transfer.make_net
    monkeypatch.setattr(hp_transfer, "make_net", lambda *a, **k: built.append(k) or make(*a, **k))
    out = tmp_path / "hpw"
    result = hp_transfer.main(["--sweep", "width", "--widths", "16", "32", "--log2-lrs", "-6", "--steps", "3",
                               "--seeds", "1", "--batch", "16", "--out", str(out)])  # fmt: skip
    assert len(result["runs"]) == 2 * 2  # settings x widths
    assert {run["width"] for run in result["runs"]} == {16, 32}
    assert sorted(k.get("base_width") or 0 for k in built) == [0, 0, 64, 64]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "best log2 lr per width" in capsys.readouterr().out


def test_hp_transfer_mlp_blocks_compare_depth_mup_with_complete_p(tmp_path, monkeypatch):
    """--block mlp trains ResidualMLPStack nets (hidden width 4 x width) under Depth-muP and CompleteP."""
    nets = []
    make = hp_transfer.make_net
    monkeypatch.setattr(hp_transfer, "make_net", lambda *a, **k: nets.append(make(*a, **k)) or nets[-1])
    result = hp_transfer.main(["--block", "mlp", "--depths", "2", "4", "--log2-lrs", "-6", "--steps", "3",
                               "--seeds", "1", "--batch", "16", "--out", str(tmp_path / "mlp")])  # fmt: skip
    assert set(result["best_log2_lr"]) == set(hp_transfer.MLP_PARAMETRIZATIONS)
    assert all(isinstance(net.stack, dmup_kernels.ResidualMLPStack) for net in nets)
    assert {(net.stack.depth, net.stack.hidden_width) for net in nets} == {(2, 512), (4, 512)}
    assert {net.stack.parametrization for net in nets} == set(hp_transfer.MLP_PARAMETRIZATIONS.values())


def test_best_log2_lr_picks_the_lowest_finite_loss():
    runs = [
        {"setting": "p", "size": 8, "log2_lr": -6.0, "loss": 0.5},
        {"setting": "p", "size": 8, "log2_lr": -5.0, "loss": 0.2},
        {"setting": "p", "size": 8, "log2_lr": -4.0, "loss": math.inf},
        {"setting": "p", "size": 16, "log2_lr": -4.0, "loss": math.inf},
    ]
    assert hp_transfer.best_log2_lrs(runs) == {"p": {8: -5.0, 16: None}}


def test_depth_limit_reports_alignment_of_consecutive_depths(tmp_path):
    result = depth_limit.main(["--depths", "4", "8", "--steps", "5", "--out", str(tmp_path / "dl.json")])
    for rows in result["alignment"].values():
        assert [row["depths"] for row in rows] == [[4, 8]]
        assert 0.0 <= rows[0]["mutual_knn"] <= 1.0 and 0.0 < rows[0]["cka"] <= 1.0 + 1e-9
    assert json.loads((tmp_path / "dl.json").read_text())["alignment"] == result["alignment"]
    assert (tmp_path / "dl.png").read_bytes()[:4] == b"\x89PNG"


def test_coord_check_example_sweeps_width_and_depth_per_setting(tmp_path, capsys):
    tables = coord_check.main(["--widths", "16", "32", "--width-sweep-depth", "2", "--depths", "2", "4",
                               "--depth-sweep-width", "16", "--adam-steps", "1", "--batch", "16",
                               "--out", str(tmp_path / "cc")])  # fmt: skip
    assert tables.keys() == coord_check.SETTINGS.keys()
    for sweeps in tables.values():
        assert {r["width"] for r in sweeps["width"]} == {16, 32} and {r["depth"] for r in sweeps["width"]} == {2}
        assert {r["depth"] for r in sweeps["depth"]} == {2, 4} and {r["width"] for r in sweeps["depth"]} == {16}
        assert {r["step"] for r in sweeps["width"]} == {0, 1}  # before the step and after it
    assert (tmp_path / "cc.png").read_bytes()[:4] == b"\x89PNG"
    assert "max/min over sizes" in capsys.readouterr().out
