"""Diagnostics on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from dmup_kernels import diagnostics as dg

DEPTH = 1024


def brownian(depth: int, width: int, generator: torch.Generator) -> torch.Tensor:
    steps = torch.randn(depth, 64, width, generator=generator, dtype=torch.float64) / math.sqrt(depth)
    return torch.cat([torch.zeros(1, 64, width, dtype=torch.float64), steps.cumsum(0)])


def smooth(depth: int, width: int, generator: torch.Generator) -> torch.Tensor:
    t = torch.linspace(0, 1, depth + 1, dtype=torch.float64).view(-1, 1, 1)
    phase = torch.rand(1, 64, width, generator=generator, dtype=torch.float64) * 2 * math.pi
    return torch.sin(2 * t + phase)


def test_brownian_path_has_kappa_one_half():
    result = dg.feature_diversity(brownian(DEPTH, 32, torch.Generator().manual_seed(0)))
    assert abs(result.kappa - 0.5) < 0.1, result


def test_smooth_path_has_kappa_zero():
    result = dg.feature_diversity(smooth(DEPTH, 32, torch.Generator().manual_seed(0)), lam=0.25)
    assert abs(result.kappa) < 0.1, result


def test_feature_diversity_distance_by_definition():
    states = torch.randn(9, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = dg.feature_diversity(list(states), lam=0.5, eps=[0.25, 0.5])
    for eps, distance in zip((0.25, 0.5), result.distance):
        expected = sum((states[4 + int(eps * 8)][i] - states[4][i]).norm() for i in range(5)) / 5 / 2.0
        assert float(distance) == pytest.approx(float(expected), rel=1e-12)


def features(samples: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(samples, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def rotation(width: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(features(width, width, seed))
    return q


@pytest.mark.parametrize("metric", [dg.mutual_knn, dg.cknna])
def test_neighbour_metrics_of_a_matrix_with_itself_are_one(metric):
    a = features(200, 16, 0)
    assert metric(a, a, k=10) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [dg.cka, dg.unbiased_cka])
def test_cka_of_a_matrix_with_itself_is_one(metric):
    a = features(200, 16, 0)
    assert metric(a, a) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "metric", [dg.mutual_knn, dg.cka, dg.unbiased_cka, dg.cknna], ids=["mutual_knn", "cka", "unbiased_cka", "cknna"]
)
def test_metrics_are_invariant_to_an_orthogonal_rotation(metric):
    a, b = features(150, 12, 1), features(150, 12, 2) + 0.5 * features(150, 12, 1)
    assert metric(a, b @ rotation(12, 3)) == pytest.approx(metric(a, b), abs=1e-9)


@pytest.mark.parametrize("metric", [dg.cka, dg.unbiased_cka])
def test_cka_of_independent_features_is_near_zero(metric):
    a, b = features(2000, 8, 4), features(2000, 8, 5)
    assert abs(metric(a, b)) < 0.02


def test_mutual_knn_of_independent_features_is_near_chance():
    a, b = features(500, 8, 6), features(500, 8, 7)
    assert dg.mutual_knn(a, b, k=10) < 0.1  # chance level is k / (N - 1) = 0.02


def test_cka_matches_the_hsic_formula():
    a, b = features(30, 5, 8), features(30, 7, 9)
    h = torch.eye(30, dtype=torch.float64) - 1.0 / 30

    def hsic(x, y):
        return torch.trace(x @ x.T @ h @ y @ y.T @ h)

    expected = hsic(a, b) / (hsic(a, a) * hsic(b, b)).sqrt()
    assert dg.cka(a, b) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dg.cka(torch.randn(5, 3), torch.randn(6, 3)), "same number of samples"),
        (lambda: dg.cka(torch.randn(5), torch.randn(5)), "2-D"),
        (lambda: dg.mutual_knn(torch.randn(5, 3), torch.randn(5, 3), k=5), "k must be smaller"),
        (lambda: dg.unbiased_cka(torch.randn(3, 2), torch.randn(3, 2)), "at least 4 samples"),
        (lambda: dg.feature_diversity(torch.randn(9, 4), lam=1.0), "lam"),
        (lambda: dg.feature_diversity(torch.randn(9, 4), eps=[0.9]), "eps"),
        (lambda: dg.feature_diversity(torch.randn(2, 4)), "at least 3 states"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def coord_table(parametrization, depths):
    import dmup_kernels as dk

    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(64, 16, generator=generator)
    targets = torch.randint(0, 4, (64,), generator=generator)

    def make(depth):
        return dk.DepthMuPNet(16, 32, depth, 4, parametrization=parametrization)

    return dg.coord_check(make, depths, (inputs, targets), steps=2, lr=1e-3)


def stream_at_depth_end(table, depth, step=0):
    return next(r["mean_abs"] for r in table if r["depth"] == depth and r["step"] == step and r["place"] == "1")


def test_coord_check_is_flat_in_depth_under_depth_mup_and_grows_without_scaling():
    import dmup_kernels as dk

    mup = coord_table(dk.DEPTH_MUP, [8, 512])
    standard = coord_table(dk.STANDARD, [8, 512])
    ratio_mup = stream_at_depth_end(mup, 512) / stream_at_depth_end(mup, 8)
    ratio_standard = stream_at_depth_end(standard, 512) / stream_at_depth_end(standard, 8)
    assert 1 / 1.2 < ratio_mup < 1.2, ratio_mup
    assert ratio_standard > 2.0, ratio_standard


def test_coord_check_table_and_plot(tmp_path):
    import dmup_kernels as dk

    table = coord_table(dk.DEPTH_MUP, [4, 16])
    assert len(table) == 2 * 2 * len(dg.COORD_CHECK_PLACES)  # depths x steps x places
    step0 = [r for r in table if r["step"] == 0]
    step1 = [r for r in table if r["step"] == 1]
    assert all(math.isnan(r["change"]) for r in step0)
    assert all(r["change"] > 0 for r in step1)  # one Adam step moved every probe
    path = dg.plot_coord_check(table, tmp_path / "coord.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coord_check_reads_out_through_readout_when_the_model_has_no_output():
    """A model with ``.readout`` and no ``.output``: its output probe is readout(stack(input(x)))."""
    import dmup_kernels as dk

    class Net(torch.nn.Module):
        def __init__(self, depth):
            super().__init__()
            self.input, self.stack, self.head = torch.nn.Linear(4, 8), dk.ResidualStack(8, depth), torch.nn.Linear(8, 3)

        def readout(self, h):
            return self.head(h)

    inputs, targets = torch.randn(16, 4), torch.randint(0, 3, (16,))
    table = dg.coord_check(Net, [2], (inputs, targets), steps=1, lr=1e-3, seed=5)
    torch.manual_seed(5)
    net = Net(2)
    with torch.no_grad():
        expected = net.readout(net.stack(net.input(inputs))).abs().mean().item()
    assert next(r["mean_abs"] for r in table if r["place"] == "output") == pytest.approx(expected, rel=1e-6)


def test_coord_check_across_width_is_flat_under_the_width_rules_and_grows_without():
    """After 5 Adam steps at widths 32 and 512 (depth 8): with base_width 32 the output's magnitude stays
    within 1.4x; without width scaling (base_width = width) it grows several-fold."""
    import dmup_kernels as dk

    generator = torch.Generator().manual_seed(11)
    data = torch.randn(64, 16, generator=generator), torch.randint(0, 4, (64,), generator=generator)

    def output_growth(base_width):
        def make(depth, width):
            return dk.DepthMuPNet(16, width, depth, 4, base_width=base_width)

        table = dg.coord_check(make, [8], data, widths=[32, 512], steps=5, lr=1e-2)
        assert {r["width"] for r in table} == {32, 512}
        last = {r["width"]: r["mean_abs"] for r in table if r["step"] == 4 and r["place"] == "output"}
        return last[512] / last[32]

    assert 1 / 1.4 < output_growth(32) < 1.4
    assert output_growth(None) > 3.0
