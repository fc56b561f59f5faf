"""Frechet distance, Inception Score and statistics files against closed forms.

Every expected value below is computed independently of the code under test: Gaussians whose
covariances commute (diagonal, or sharing eigenvectors) have Tr((S1 S2)^{1/2}) = sum_i
sqrt(a_i b_i), so d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
"""

import numpy as np
import pytest
from scipy.stats import entropy

from diffjax.evaluation import fid

METHODS = tuple(fid.FD_METHODS)


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("method", METHODS)
def test_one_dimensional_gaussians(method):
    mu1, s1, mu2, s2 = 0.3, 2.0, -1.1, 0.5
    expected = (mu1 - mu2) ** 2 + s1 + s2 - 2.0 * np.sqrt(s1 * s2)
    got = fid.frechet_distance([mu1], [[s1]], [mu2], [[s2]], method=method)
    # Both methods are float64 eigen/Schur computations on a 1x1 matrix: round-off only.
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_covariances(method):
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_commuting_full_covariances(method):
    # Same eigenvectors, different spectra: full (non-diagonal) matrices with a known answer.
    rng = np.random.default_rng(1)
    d = 64
    q = _random_orthogonal(rng, d)
    a, b = rng.uniform(0.05, 4.0, size=d), rng.uniform(0.05, 4.0, size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    # Condition number <= 80 and traces ~ 130: float64 round-off stays far below 1e-8 relative.
    assert got == pytest.approx(expected, rel=1e-8)


def test_methods_agree_on_random_covariances_and_distance_properties():
    rng = np.random.default_rng(2)
    d, n = 48, 400
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    y = 0.5 + rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    sx, sy = fid.compute_statistics(x), fid.compute_statistics(y)
    by_method = {m: fid.frechet_distance_stats(sx, sy, method=m) for m in METHODS}
    # eigh of a symmetric product vs scipy's Schur-based sqrtm: independent algorithms.
    assert by_method["eigh"] == pytest.approx(by_method["sqrtm"], rel=1e-8)
    assert by_method["eigh"] > 0
    # A distance: symmetric, and 0 between a distribution and itself (up to round-off of
    # traces ~ 1e3).
    assert fid.frechet_distance_stats(sy, sx) == pytest.approx(by_method["eigh"], rel=1e-10)
    assert abs(fid.frechet_distance_stats(sx, sx)) < 1e-7 * np.trace(sx.sigma)


def test_singular_covariances():
    # Diagonal with zeros (rank-deficient, as with fewer samples than feature dims).
    a = np.array([1.0, 0.0, 2.0, 0.0])
    b = np.array([0.0, 3.0, 2.0, 0.0])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    zeros = np.zeros(4)
    got = fid.frechet_distance(zeros, np.diag(a), zeros, np.diag(b), method="eigh")
    assert got == pytest.approx(expected, rel=1e-12)
    # Fewer samples than dimensions: both covariances singular; the result stays finite and
    # the methods agree (sqrtm adds pytorch-fid's eps = 1e-6 offset if needed, which moves
    # the trace by O(sqrt(eps)) at most).
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 30)), rng.normal(size=(10, 30)) + 0.1
    sx, sy = fid.compute_statistics(x), fid.compute_statistics(y)
    eigh, sqrtm = (fid.frechet_distance_stats(sx, sy, method=m) for m in METHODS)
    assert np.isfinite(eigh) and np.isfinite(sqrtm)
    assert eigh == pytest.approx(sqrtm, rel=1e-3)


def test_compute_statistics_is_unbiased_covariance():
    x = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    stats = fid.compute_statistics(x)
    np.testing.assert_allclose(stats.mu, [3.0, 2.0])
    # By hand: deviations (-2, 0), (0, -2), (2, 2); sums of products / (N - 1 = 2).
    np.testing.assert_allclose(stats.sigma, [[4.0, 2.0], [2.0, 4.0]])
    assert stats.num == 3
    with pytest.raises(ValueError, match="N >= 2"):
        fid.compute_statistics(x[:1])
    with pytest.raises(ValueError, match="non-finite"):
        fid.compute_statistics(np.array([[1.0, np.nan], [0.0, 0.0]]))


def test_statistics_round_trip_and_foreign_files(tmp_path):
    rng = np.random.default_rng(4)
    stats = fid.compute_statistics(rng.normal(size=(50, 6)), meta={"network": "test", "n": 50})
    path = tmp_path / "stats.npz"
    fid.save_statistics(path, stats)
    loaded = fid.load_statistics(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num == 50 and dict(loaded.meta) == {"network": "test", "n": "50"}

    # pytorch-fid / TTUR statistics hold only mu and sigma.
    np.savez(tmp_path / "ttur.npz", mu=stats.mu, sigma=stats.sigma)
    assert fid.load_statistics(tmp_path / "ttur.npz").num == 0

    np.savez(tmp_path / "bad.npz", mean=stats.mu)
    with pytest.raises(ValueError, match="lacks \\['mu', 'sigma'\\]"):
        fid.load_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_statistics(tmp_path / "missing.npz")


def test_inception_score_closed_forms():
    k = 10
    # Identical predictions for every image: p(y|x) = p(y), so KL = 0 and IS = 1.
    assert fid.inception_score(np.zeros((40, k)), num_splits=2)[0] == pytest.approx(1.0)
    # Confident, evenly spread predictions: KL = log K, so IS = K (up to exp(-50) leakage).
    confident = 50.0 * np.eye(k)[np.arange(100) % k]
    mean, std = fid.inception_score(confident, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_scipy_entropy_per_split():
    rng = np.random.default_rng(5)
    logits = 3.0 * rng.normal(size=(60, 7))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for part in np.split(p, 3):
        # KL(p(y|x) || p(y)) with scipy's independent implementation.
        scores.append(np.exp(np.mean([entropy(row, part.mean(axis=0)) for row in part])))
    mean, std = fid.inception_score(logits, num_splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="unknown method 'svd'; allowed: eigh, sqrtm"):
        fid.frechet_distance([0.0], [[1.0]], [0.0], [[1.0]], method="svd")
    with pytest.raises(ValueError, match="shapes do not match"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="num_splits=0"):
        fid.inception_score(np.zeros((4, 3)), num_splits=0)


def test_real_train_fd_is_zero_for_the_reference_itself_and_positive_for_a_subset():
    # real_train_fd: FD(real draw, reference) with the classifier's features. All the training
    # images against their own statistics give FD(X, X) = 0 (up to the matrix square root's
    # error); asking for more images than exist takes them all; a subset differs from the whole.
    import jax

    from diffjax.evaluation import digits_classifier as dc
    from diffjax.evaluation.run_metrics import real_train_fd

    cfg = dc.ClassifierConfig(hidden=(32, 16))
    model = dc.MLPClassifier(cfg.hidden, cfg.num_classes)
    params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
    images = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    reference = fid.compute_statistics(dc.classifier_outputs(params, images, cfg)[0])
    for num in (200, 500):
        assert abs(real_train_fd(images, num, reference, params, cfg)) < 1e-3
    assert real_train_fd(images, 50, reference, params, cfg) > 1e-3
