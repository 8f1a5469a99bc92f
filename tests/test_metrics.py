"""Metrics and the external sort against independent numpy / scipy / sklearn computations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from edice_dist import _extsort
from edice_dist.metrics import METRICS, call_peaks, metrics_from_arrays, track_metrics


def _top(values: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the top ``ceil(fraction * n)`` bins: descending value, ties by position."""
    n = len(values)
    k = int(np.ceil(round(fraction * n, 9)))
    order = np.lexsort((np.arange(n), -values.astype(np.float64)))
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask


def reference(t, y, p, regions=None) -> dict:
    """Every metric by its textbook definition on float32 inputs."""
    t = np.asarray(t, dtype=np.float32).astype(np.float64)
    y = np.asarray(y, dtype=np.float32).astype(np.float64)
    p = np.asarray(p, dtype=bool)
    t1, t5, y1, y5 = _top(t, 0.01), _top(t, 0.05), _top(y, 0.01), _top(y, 0.05)
    k1 = t1.sum()
    e = (t - y) ** 2
    out = {
        "mse": e.mean(),
        "mse1obs": e[t1].mean(),
        "mse1imp": e[y1].mean(),
        "mse_fg": e[p].mean() if p.any() else np.nan,
        "mse_bg": e[~p].mean() if (~p).any() else np.nan,
        "match1": (t1 & y1).sum() / k1,
        "catch1obs": (t1 & y5).sum() / k1,
        "catch1imp": (y1 & t5).sum() / k1,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["gwcorr"] = stats.pearsonr(t, y)[0] if t.std() and y.std() else np.nan
        out["gwspear"] = stats.spearmanr(t, y)[0] if t.std() and y.std() else np.nan
    both = 0 < p.sum() < len(p)
    out["auroc"] = roc_auc_score(p, y) if both else np.nan
    out["auprc"] = average_precision_score(p, y) if p.any() else np.nan
    out["aucobs1"] = roc_auc_score(t1, y) if k1 < len(t) else np.nan
    out["aucimp1"] = roc_auc_score(y1, t) if k1 < len(t) else np.nan
    for name, mask in (regions or {}).items():
        out[f"mse_{name}"] = e[mask].mean() if mask.any() else np.nan
    return out


def assert_matches(got: dict, want: dict, rtol=1e-9):
    for k, v in want.items():
        assert k in got, k
        if np.isnan(v):
            assert np.isnan(got[k]), (k, got[k])
        else:
            assert got[k] == pytest.approx(v, rel=rtol, abs=1e-12), (k, got[k], v)


def _tied(rng, n):
    """Gamma-like signal rounded so that many values tie, and a noisy imputation."""
    t = np.round(rng.gamma(0.4, 1.5, n), rng.integers(0, 3)).astype(np.float32)
    y = (0.6 * t + np.round(rng.normal(0, 0.6, n), rng.integers(0, 2))).astype(np.float32)
    return t, y


# ---------------------------------------------------------------- the external sort


def test_float_keys_preserve_order_and_invert():
    v = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0, 7e30, np.inf], np.float32)
    asc = _extsort.float_keys(v, descending=False)
    assert np.all(np.diff(asc.astype(np.int64)) >= 0)
    assert asc[3] == asc[4]  # -0.0 == 0.0 as floats, so the keys tie too
    assert np.array_equal(np.diff(asc.astype(np.int64)) == 0, np.diff(v) == 0)
    desc = _extsort.float_keys(v)
    assert np.all(np.diff(desc.astype(np.int64)) <= 0)
    back = _extsort.key_values(desc)
    assert np.array_equal(back, v + np.float32(0.0))
    assert np.array_equal(_extsort.key_values(asc, descending=False), v + np.float32(0.0))


@pytest.mark.parametrize("run_size,merge_size", [(1 << 20, None), (37, 11), (64, 3), (100, 1000)])
def test_external_sort_equals_lexsort(tmp_path, run_size, merge_size):
    rng = np.random.default_rng(run_size)
    n = 2500
    values = np.round(rng.normal(0, 2, n), 0).astype(np.float32)  # many ties
    payload = rng.integers(0, 1000, n).astype(np.int32)
    sorter = _extsort.ExternalSorter({"p": np.int32}, run_size=run_size,
                                     merge_size=merge_size, tmpdir=str(tmp_path))
    for s in range(0, n, 333):  # pieces unrelated to the run size
        sorter.add(_extsort.combined_keys(values[s:s + 333], s), p=payload[s:s + 333])
    blocks = list(sorter.sorted_blocks())
    keys = np.concatenate([k for k, _ in blocks])
    got_p = np.concatenate([c["p"] for _, c in blocks])
    if run_size < n:
        assert sorter.n_runs == -(-n // run_size)
        assert max(len(k) for k, _ in blocks) <= max(merge_size or run_size, sorter.n_runs)
    sorter.close()
    assert list(tmp_path.iterdir()) == []  # runs removed

    want = np.lexsort((np.arange(n), -values))
    idx = _extsort.key_index(keys)
    assert np.array_equal(idx, want)
    assert np.array_equal(got_p, payload[want])
    assert np.array_equal(_extsort.key_values(_extsort.key_value_part(keys)), values[want])


def test_external_sort_of_keys_in_any_order(tmp_path):
    rng = np.random.default_rng(11)
    n = 1500
    values = np.round(rng.normal(0, 1, n), 1).astype(np.float32)
    keys = _extsort.combined_keys(values, rng.permutation(n))  # indices out of order
    order = rng.permutation(n)  # and added in a random order
    sorter = _extsort.ExternalSorter({}, run_size=97, merge_size=50, tmpdir=str(tmp_path))
    for s in range(0, n, 200):
        sorter.add(keys[order[s:s + 200]])
    got = np.concatenate([k for k, _ in sorter.sorted_blocks()])
    assert np.array_equal(got, np.sort(keys))
    assert np.array_equal(_extsort.sort_order(keys), np.argsort(keys))
    genome_order = _extsort.combined_keys(values, 0)  # the fast path
    assert np.array_equal(_extsort.sort_order(genome_order), np.argsort(genome_order))


def test_external_sort_rejects_bad_input():
    s = _extsort.ExternalSorter({"p": np.int32}, run_size=4)
    with pytest.raises(ValueError, match="uint64"):
        s.add(np.arange(3), p=np.arange(3))
    with pytest.raises(ValueError, match="payload"):
        s.add(np.arange(3, dtype=np.uint64), q=np.arange(3))
    with pytest.raises(ValueError, match="shape"):
        s.add(np.arange(3, dtype=np.uint64), p=np.arange(4))
    with pytest.raises(ValueError, match="2\\*\\*32"):
        _extsort.combined_keys(np.zeros(3, np.float32), 2**32 - 2)


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_references_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(200, 4000))
    t, y = _tied(rng, n)
    p = t > np.quantile(t, 0.85)
    regions = {"promoter": rng.random(n) < 0.1, "enhancer": rng.random(n) < 0.03}
    want = reference(t, y, p, regions)
    got = metrics_from_arrays(t, y, p, regions)
    assert list(got)[:len(METRICS)] == list(METRICS)
    assert_matches(got, want)
    assert got["n_bins"] == n and got["n_peaks"] == p.sum()
    assert got["n_top1"] == _top(t, 0.01).sum() and got["n_promoter"] == regions["promoter"].sum()


@pytest.mark.parametrize("seed", range(4))
def test_chunking_and_many_runs_give_the_same_result(seed, tmp_path):
    rng = np.random.default_rng(100 + seed)
    n = 3000
    t, y = _tied(rng, n)
    p = rng.random(n) < 0.2
    one = metrics_from_arrays(t, y, p)
    # Irregular chunks, runs of a few keys and a merge that holds fewer keys than runs:
    # tie groups straddle every kind of block boundary.
    cuts = np.sort(rng.choice(np.arange(1, n), 40, replace=False))
    bounds = [0, *cuts.tolist(), n]
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    many = track_metrics((t[s] for s in parts), (y[s] for s in parts), (p[s] for s in parts),
                         run_size=int(rng.integers(40, 200)), merge_size=int(rng.integers(5, 60)),
                         tmpdir=str(tmp_path))
    for k in one:
        if isinstance(one[k], float) and np.isnan(one[k]):
            assert np.isnan(many[k]), k
        else:
            assert many[k] == pytest.approx(one[k], rel=1e-12, abs=1e-14), k
    assert_matches(many, reference(t, y, p))


def test_large_tie_group_across_many_blocks():
    """Most bins are zero (as in real tracks): one tie group spans every block."""
    rng = np.random.default_rng(7)
    n = 5000
    t = np.where(rng.random(n) < 0.9, 0.0, rng.gamma(1, 1, n)).astype(np.float32)
    y = np.where(rng.random(n) < 0.8, 0.0, t + rng.random(n)).astype(np.float32)
    p = t > 1
    got = metrics_from_arrays(t, y, p, chunk_size=97, run_size=300, merge_size=40)
    assert_matches(got, reference(t, y, p))


def test_values_compare_as_float32():
    # Distinct in float64, equal in float32: they tie, and ties go to the earlier bin.
    t = np.array([1.0, 1.0 + 1e-12, 0.5] + [0.0] * 197)
    y = np.array([0.0, 3.0, 0.0] + [0.0] * 197)
    got = metrics_from_arrays(t, y, t > 0.7)
    assert got["n_top1"] == 2
    # Truth top 1 % = bins 0, 1 (tie broken by genome order); imputation's = bins 1, 0.
    assert got["match1"] == 1.0
    assert_matches(got, reference(t.astype(np.float32), y, t > 0.7))


def test_constant_tracks_give_nan_correlations_and_no_crash():
    rng = np.random.default_rng(3)
    n = 500
    t = rng.gamma(1, 1, n).astype(np.float32)
    p = t > 1.5
    flat = np.full(n, 0.7, np.float32)
    for a, b in ((t, flat), (flat, t), (flat, flat)):
        got = metrics_from_arrays(a, b, p, chunk_size=64, run_size=100, merge_size=50)
        assert np.isnan(got["gwcorr"]) and np.isnan(got["gwspear"])
        assert_matches(got, reference(a, b, p))
    # A constant imputation ranks every bin equally: ROC areas are exactly one half.
    got = metrics_from_arrays(t, flat, p)
    assert got["auroc"] == 0.5 and got["aucobs1"] == 0.5
    assert got["auprc"] == pytest.approx(p.mean())


def test_empty_and_full_peak_sets():
    rng = np.random.default_rng(4)
    n = 400
    t, y = _tied(rng, n)
    none = metrics_from_arrays(t, y, np.zeros(n, bool))
    assert np.isnan(none["auprc"]) and np.isnan(none["auroc"]) and np.isnan(none["mse_fg"])
    assert none["mse_bg"] == pytest.approx(none["mse"]) and none["n_peaks"] == 0
    assert_matches(none, reference(t, y, np.zeros(n, bool)))
    assert_matches(metrics_from_arrays(t, y, None), reference(t, y, np.zeros(n, bool)))
    full = metrics_from_arrays(t, y, np.ones(n, bool))
    assert np.isnan(full["auroc"]) and np.isnan(full["mse_bg"])
    assert full["auprc"] == pytest.approx(average_precision_score(np.ones(n, bool), y))
    assert full["auprc"] == pytest.approx(1.0)
    assert full["mse_fg"] == pytest.approx(full["mse"])


def test_tiny_tracks():
    got = metrics_from_arrays(np.array([2.0]), np.array([1.0]))
    assert got["mse"] == 1.0 and got["match1"] == 1.0
    assert np.isnan(got["aucobs1"]) and np.isnan(got["aucimp1"]) and np.isnan(got["gwcorr"])
    t, y, p = np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([True, False])
    assert_matches(metrics_from_arrays(t, y, p), reference(t, y, p))


def test_bad_chunks_are_rejected():
    with pytest.raises(ValueError, match="imputation chunks end early"):
        track_metrics([np.ones(3), np.ones(3)], [np.ones(3)])
    with pytest.raises(ValueError, match="peak chunks end early"):
        track_metrics([np.ones(3), np.ones(3)], [np.ones(3), np.ones(3)], [np.ones(3, bool)])
    with pytest.raises(ValueError, match="chunk 1: truth has 3 bins, imputation 2"):
        track_metrics([np.ones(3), np.ones(3)], [np.ones(3), np.ones(2)])
    with pytest.raises(ValueError, match="non-finite"):
        track_metrics([np.array([1.0, np.nan])], [np.ones(2)])
    with pytest.raises(ValueError, match="no bins"):
        track_metrics([], [])


def test_call_peaks_rule():
    pval = np.array([0.0, 1.99, 2.0, 5.0])
    assert call_peaks(pval).tolist() == [False, False, True, True]
