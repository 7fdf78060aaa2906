"""The theory, executed: LoD with uniformly drawn ranks recovers the ordered SVD of a linear map
and PCA of a linear autoencoder; the same layer trained without ordered dropout does not."""

import dataclasses
import math

import pytest
import torch

from maestro_lod import cli
from maestro_lod.theory import (PCA_SETTINGS, SVD_SETTINGS, TrainSettings, flat_tail_spectrum, gap_ranks,
                                geometric_spectrum, ordering_violations, pca_problem, principal_angle_deg, rank_rows,
                                sample_unit_ball, strictly_ordered, svd_problem, train_layer)

MAX_ANGLE_DEG = 5.0
MAX_ERROR_RATIO = 1.05


def _assert_recovers_ordered_truncations(rows, problem):
    """Every b with a spectral gap: both subspaces within 5°, error within 5% of Eckart–Young,
    importance equal to σ_b within 2%, and importances ordered like the σ."""
    gaps = gap_ranks(problem.values, len(rows))
    assert gaps, "the problem has no spectral gap to check"
    for row in rows:
        if row.rank in gaps:
            assert row.left_angle <= MAX_ANGLE_DEG, row
            assert row.right_angle <= MAX_ANGLE_DEG, row
            assert row.ratio <= MAX_ERROR_RATIO, row
            assert row.importance == pytest.approx(row.singular_value, rel=0.02), row
    assert strictly_ordered(rows, problem.values), ordering_violations(rows, problem.values)


def _assert_contrast_is_unordered(rows, problem):
    """Full rank is right, truncations are not: no ordering and at least one b < r far off optimum."""
    full = rows[-1]
    assert full.left_angle <= MAX_ANGLE_DEG and full.right_angle <= MAX_ANGLE_DEG, full
    assert full.ratio <= MAX_ERROR_RATIO, full
    assert not strictly_ordered(rows, problem.values)
    assert max(row.ratio for row in rows[:-1]) > 1.5
    assert max(row.left_angle for row in rows[:-1]) > 30.0


def test_lod_recovers_the_svd_for_a_geometric_spectrum():
    problem = svd_problem("geometric", seed=0)
    rows = rank_rows(train_layer(problem, SVD_SETTINGS, ordered=True), problem)
    assert [row.rank for row in rows] == list(range(1, SVD_SETTINGS.rank + 1))
    _assert_recovers_ordered_truncations(rows, problem)


def test_lod_recovers_the_svd_head_and_optimal_errors_with_a_flat_tail():
    problem = svd_problem("flat", seed=1)
    assert gap_ranks(problem.values, SVD_SETTINGS.rank) == [1, 2, 3, 4, 5]
    rows = rank_rows(train_layer(problem, dataclasses.replace(SVD_SETTINGS, seed=1), ordered=True), problem)
    _assert_recovers_ordered_truncations(rows, problem)
    # Inside the flat tail the optimal subspace is not unique but the optimal error is.
    assert all(row.ratio <= MAX_ERROR_RATIO for row in rows)


def test_lod_autoencoder_recovers_the_principal_components_in_order():
    problem = pca_problem(seed=0)
    rows = rank_rows(train_layer(problem, PCA_SETTINGS, ordered=True), problem)
    _assert_recovers_ordered_truncations(rows, problem)
    # Every rank has gaps on both sides here, so each learned direction is one principal component.
    assert all(row.direction_angle <= MAX_ANGLE_DEG for row in rows)


def test_without_ordered_dropout_the_svd_is_right_at_full_rank_only():
    problem = svd_problem("geometric", seed=0)
    rows = rank_rows(train_layer(problem, SVD_SETTINGS, ordered=False), problem)
    _assert_contrast_is_unordered(rows, problem)


def test_without_ordered_dropout_the_autoencoder_learns_the_span_but_no_order():
    problem = pca_problem(seed=0)
    rows = rank_rows(train_layer(problem, PCA_SETTINGS, ordered=False), problem)
    _assert_contrast_is_unordered(rows, problem)


def test_training_is_seeded():
    problem = svd_problem("geometric", seed=3)
    settings = TrainSettings(rank=4, steps=20, batch=64, seed=3)
    first, second = (train_layer(problem, settings, ordered=True) for _ in range(2))
    assert torch.equal(first.up, second.up) and torch.equal(first.down, second.down)
    other = train_layer(problem, dataclasses.replace(settings, seed=4), ordered=True)
    assert not torch.equal(first.up, other.up)


def test_the_optimum_is_the_truncated_svd_and_is_measured_as_such():
    problem = svd_problem("geometric", seed=2)
    p, q, s = problem.left, problem.right, problem.values * (problem.in_features + 2) ** 0.5
    for b in (1, 3, 8):
        best = (p[:, :b] * s[:b]) @ q[:, :b].T
        assert float(problem.risk(best)) == pytest.approx(float(problem.optimal_risk(b)), rel=1e-9)
        worse = best + 1e-2 * torch.outer(p[:, b], q[:, b + 1])
        assert float(problem.risk(worse)) > float(problem.optimal_risk(b))


def test_principal_angle_of_a_known_rotation():
    basis = torch.eye(4, dtype=torch.float64)[:, :2]
    theta = math.radians(30.0)
    rotated = basis.clone()
    rotated[:, 1] = torch.tensor([0.0, math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
    assert principal_angle_deg(basis, rotated) == pytest.approx(30.0, abs=1e-9)
    assert principal_angle_deg(basis, basis @ torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        principal_angle_deg(basis, torch.eye(4, dtype=torch.float64)[:, :3])


def test_spectra_and_their_gaps():
    assert gap_ranks(geometric_spectrum(6, 0.5), 6) == [1, 2, 3, 4, 5, 6]
    flat = flat_tail_spectrum(10, head=3, ratio=0.5, tail=0.1)
    assert flat.tolist() == pytest.approx([1.0, 0.5, 0.25] + [0.1] * 7)
    assert gap_ranks(flat, 8) == [1, 2, 3]
    with pytest.raises(ValueError, match="ratio=1.5"):
        geometric_spectrum(4, 1.5)
    with pytest.raises(ValueError, match="tail=0.3"):
        flat_tail_spectrum(10, head=3, ratio=0.5, tail=0.3)


def test_unit_ball_samples_have_the_expected_second_moment():
    x = sample_unit_ball(40_000, 8, torch.Generator().manual_seed(0))
    assert float(x.norm(dim=1).max()) <= 1.0
    second_moment = x.T @ x / x.shape[0]
    assert torch.allclose(second_moment, torch.eye(8) / 10, atol=4e-3)


def test_bad_settings_and_ranks_are_rejected():
    with pytest.raises(ValueError, match="steps=0"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="rank=40"):
        train_layer(svd_problem("geometric"), TrainSettings(rank=40, steps=1), ordered=True)
    with pytest.raises(ValueError, match="'circle'"):
        svd_problem("circle")


def test_demo_refuses_to_overwrite_and_wrong_suffix(tmp_path, capsys):
    existing = tmp_path / "figure.png"
    existing.write_bytes(b"keep")
    assert cli.main(["demo", "svd", "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep"
    assert cli.main(["demo", "pca", "--out", str(tmp_path / "figure.jpg")]) == 2
    assert "must end in .png" in capsys.readouterr().err
