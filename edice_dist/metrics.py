"""The field's imputation metrics, per track over all bins of all chromosomes, exact and
streamed chunk by chunk in memory that does not grow with the genome.

Definitions (``t`` = truth, ``y`` = imputation, both float32 after reading bigWigs; the
caller picks the space, arcsinh(-log10 p) by default):

- ``mse``: mean of (t - y)^2. ``gwcorr``: Pearson correlation of t and y. ``gwspear``:
  Spearman correlation = Pearson correlation of the average (mid) ranks.
- Top sets: the top 1 % of a track are the first ``ceil(n / 100)`` bins of a stable
  descending sort of its values, ties broken by genome order (chromosomes in chrom.sizes
  order, then bin); the top 5 % the first ``ceil(n / 20)``. Values are compared as float32.
- ``mse1obs`` / ``mse1imp``: MSE over the truth's / the imputation's top 1 %.
- ``mse_fg`` / ``mse_bg``: MSE over peak bins / the other bins. ``mse_<region>``: MSE over
  the bins of an annotation (promoter, gene body, enhancer...).
- ``auprc``: average precision of peak bins (positives) scored by y, as
  ``sklearn.metrics.average_precision_score``: sum over distinct score thresholds, from the
  highest, of (recall step) x precision, tied scores forming one threshold.
- ``auroc``: area under the ROC curve of the same, ties counted as half (the trapezoid rule
  of ``sklearn.metrics.roc_auc_score``, equal to the Mann-Whitney U with mid ranks).
- ``auprc_person`` (only when person-specific peaks are given): average precision, as
  ``auprc``, of the person-specific peak bins (peaks of an individual's track that the
  same cell type and assay of the other individuals lack: :mod:`edice_dist.personpeaks`)
  among all bins; ``person_frac``, their share of the bins, is its chance level.
- ``match1`` = |top1(t) & top1(y)| / |top1|. ``catch1obs`` = share of top1(t) in top5(y).
  ``catch1imp`` = share of top1(y) in top5(t). ``aucobs1`` = AUROC with labels top1(t) and
  scores y. ``aucimp1`` = AUROC with labels top1(y) and scores t (ChromImpute's measures).

Undefined values are NaN, never an exception: correlations of a constant track (zero
variance), ``auroc`` when there are no peak bins or only peak bins, ``auprc`` when there
are no peak bins (all peak bins gives 1.0), ``mse_fg`` / ``mse_bg`` / ``mse_<region>``
over an empty set, ``aucobs1`` / ``aucimp1`` of a one-bin track. Means over tracks skip
NaN and report how many tracks they used.

How: one pass in genome order accumulates the sums-based metrics (float64, per-chunk
centred sums merged with Chan's formula) and feeds an external sort by truth value.
Streaming that order gives the truth's top sets and mid ranks, and feeds a second
external sort by imputed value that carries the truth value, the truth's rank and the
labels; streaming it gives the imputation's ranks and top sets, the AUCs (tie groups
carried across blocks as running sums) and the rank cross-product for Spearman.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from ._extsort import (
    MAX_INDEX,
    ExternalSorter,
    combined_keys,
    key_index,
    key_value_part,
    key_values,
)

METRICS = ("mse", "gwcorr", "gwspear", "mse1obs", "mse1imp", "mse_fg", "mse_bg", "auprc",
           "auroc", "match1", "catch1obs", "catch1imp", "aucobs1", "aucimp1")
"""Metric columns of ``metrics.tsv``, in order."""

PERSON_METRICS = ("auprc_person", "person_frac")
"""Columns added when person-specific peaks are given: the AUPRC and its chance level."""
TRUTH_METRICS = frozenset({"person_frac"})
"""Columns that describe the truth track, not the method: the same for every method."""

REGIONS = ("promoter", "genebody", "enhancer")
"""Annotation regions with a conventional column name ``mse_<region>``."""

PEAK_PVAL = 2.0
"""Peaks called from a truth track without a BED: bins with -log10 p >= 2 (p <= 0.01,
MACS2's default-like cut-off)."""

_PEAK, _T1, _T5, _PERSON = np.uint8(1), np.uint8(2), np.uint8(4), np.uint8(8)


def lower_is_better(metric: str) -> bool:
    """True for the error metrics (``mse*``), False for scores."""
    return metric.startswith("mse")


def top_count(n: int, percent: int) -> int:
    """Size of a top ``percent`` % set of ``n`` bins: ``ceil(n * percent / 100)``, in
    integer arithmetic (``0.01 * 300`` is not 3 in floating point)."""
    return (n * percent + 99) // 100


def call_peaks(pval: np.ndarray, threshold: float = PEAK_PVAL) -> np.ndarray:
    """Peak bins of a truth track given in -log10 p: ``pval >= threshold``.

    Parameters
    ----------
    pval : np.ndarray, shape (n,)

    Returns
    -------
    np.ndarray, shape (n,), bool
    """
    return np.asarray(pval) >= threshold


class _Moments:
    """Streaming n, means, centred second moments and co-moment (Chan et al.)."""

    def __init__(self):
        self.n = 0
        self.mt = self.my = self.m2t = self.m2y = self.cty = 0.0

    def add(self, t: np.ndarray, y: np.ndarray) -> None:
        nc = len(t)
        if nc == 0:
            return
        mt, my = float(t.mean()), float(y.mean())
        dt, dy = t - mt, y - my
        # Plain sums, not BLAS dot products: pairwise summation, and no BLAS threads
        # spinning on a busy machine.
        m2t, m2y, cty = float(np.sum(dt * dt)), float(np.sum(dy * dy)), float(np.sum(dt * dy))
        n = self.n + nc
        et, ey = mt - self.mt, my - self.my
        w = self.n * nc / n
        self.m2t += m2t + et * et * w
        self.m2y += m2y + ey * ey * w
        self.cty += cty + et * ey * w
        self.mt += et * nc / n
        self.my += ey * nc / n
        self.n = n


class _Curve:
    """ROC area and average precision over tie groups streamed in descending score order.

    Each closed group adds its positives ``tp`` and negatives ``fp``; ties are one
    threshold, so a group adds ``fp * (TP_before + tp / 2)`` to the ROC area and
    ``tp * precision`` to average precision."""

    def __init__(self):
        self.tp = self.fp = 0
        self.auc2 = 0  # twice the un-normalised ROC area: an exact integer
        self.ap = 0.0

    def add(self, tp: np.ndarray, fp: np.ndarray) -> None:
        if len(tp) == 0:
            return
        tpc = self.tp + np.cumsum(tp)
        fpc = self.fp + np.cumsum(fp)
        self.auc2 += int(np.sum(fp * (2 * tpc - tp)))
        hit = tp > 0
        self.ap += float(np.sum(tp[hit] * (tpc[hit] / (tpc[hit] + fpc[hit]))))
        self.tp, self.fp = int(tpc[-1]), int(fpc[-1])

    def auroc(self) -> float:
        if self.tp == 0 or self.fp == 0:
            return float("nan")
        return self.auc2 / (2.0 * self.tp * self.fp)

    def auprc(self) -> float:
        return self.ap / self.tp if self.tp else float("nan")


def _segments(vk: np.ndarray, carry_vk) -> tuple[np.ndarray, bool]:
    """Local starts of the runs of equal value keys in a sorted block, and whether the
    first run continues the group left open by the previous block."""
    starts = np.concatenate(([0], np.flatnonzero(vk[1:] != vk[:-1]) + 1))
    return starts, carry_vk is not None and vk[0] == carry_vk


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _chunks(truth_chunks, imp_chunks, peak_chunks, region_chunks, person_chunks=None):
    """Aligned, validated float32 / bool chunks; every iterable must have as many chunks."""
    end = object()
    its = {"truth": iter(truth_chunks), "imputation": iter(imp_chunks)}
    if peak_chunks is not None:
        its["peak"] = iter(peak_chunks)
    if region_chunks is not None:
        its["region"] = iter(region_chunks)
    if person_chunks is not None:
        its["person"] = iter(person_chunks)
    for i in itertools.count():
        got = {k: next(it, end) for k, it in its.items()}
        done = [k for k, v in got.items() if v is end]
        if len(done) == len(got):
            return
        if done:
            raise ValueError(f"the {' and '.join(done)} chunks end early, at chunk {i}")
        t = np.asarray(got["truth"], dtype=np.float32).reshape(-1)
        y = np.asarray(got["imputation"], dtype=np.float32).reshape(-1)
        if t.shape != y.shape:
            raise ValueError(f"chunk {i}: truth has {len(t)} bins, imputation {len(y)}")
        for name, a in (("truth", t), ("imputation", y)):
            if not np.isfinite(a).all():
                raise ValueError(f"chunk {i}: the {name} has non-finite values (NaN or inf)")
        p, q = (_mask(got.get(k), len(t), i, k) for k in ("peak", "person"))
        r = got.get("region")
        if r is not None:
            r = {k: np.asarray(v, dtype=bool).reshape(-1) for k, v in r.items()}
            for k, v in r.items():
                if v.shape != t.shape:
                    raise ValueError(f"chunk {i}: region {k!r} has {len(v)} bins, truth {len(t)}")
        yield t, y, p, r, q


def _mask(m, n: int, i: int, what: str) -> np.ndarray:
    if m is None:
        return np.zeros(n, dtype=bool)
    m = np.asarray(m, dtype=bool).reshape(-1)
    if len(m) != n:
        raise ValueError(f"chunk {i}: {what} mask has {len(m)} bins, truth {n}")
    return m


def track_metrics(
    truth_chunks: Iterable[np.ndarray],
    imp_chunks: Iterable[np.ndarray],
    peak_chunks: Iterable[np.ndarray] | None = None,
    region_chunks: Iterable[dict[str, np.ndarray]] | None = None,
    person_chunks: Iterable[np.ndarray] | None = None,
    *,
    run_size: int = 1 << 21,
    merge_size: int | None = None,
    tmpdir: str | None = None,
) -> dict:
    """Every metric of one track, streamed over aligned chunks in genome order.

    Parameters
    ----------
    truth_chunks, imp_chunks : iterables of np.ndarray, each of shape (m_i,)
        The truth and the imputation, chunk by chunk (e.g. 25 bp bins of one chromosome
        window after another), cast to float32; values must be finite.
    peak_chunks : iterable of np.ndarray of shape (m_i,), bool, optional
        Peak bins of the truth (positives of ``auprc`` / ``auroc``, the ``mse_fg`` set).
        None means no peaks (those metrics are NaN).
    region_chunks : iterable of dict[str, np.ndarray of shape (m_i,)], optional
        Annotation masks; each name ``r`` adds ``mse_<r>`` and ``n_<r>``.
    person_chunks : iterable of np.ndarray of shape (m_i,), bool, optional
        Person-specific peak bins: adds ``auprc_person``, ``person_frac`` and ``n_person``.
    run_size, merge_size : int
        Keys per in-memory run / per merge step of the external sorts. Memory depends
        on them, not on the genome length: ~450 MiB peak RSS at the defaults, measured
        flat from 20 M to 124 M bins (``benchmarks/bench_evaluate.py``).
    tmpdir : str, optional
        Folder for the sort runs (about 34 bytes per bin at the peak).

    Returns
    -------
    dict
        The metrics of :data:`METRICS` (floats, NaN where undefined; see the module
        docstring), ``mse_<region>`` for each region, and the counts ``n_bins``,
        ``n_peaks``, ``n_top1``, ``n_top5`` and ``n_<region>``; with ``person_chunks``,
        ``auprc_person``, ``person_frac`` and ``n_person`` too.
    """
    tkw = dict(run_size=run_size, merge_size=merge_size, tmpdir=tmpdir)
    with ExternalSorter({"imp": np.float32, "flags": np.uint8}, **tkw) as by_truth:
        out, mom, tmin, tmax, ymin, ymax = _genome_pass(
            truth_chunks, imp_chunks, peak_chunks, region_chunks, person_chunks, by_truth)
        n = mom.n
        if n == 0:
            raise ValueError("the tracks have no bins")
        if n >= MAX_INDEX:
            raise ValueError(f"{n} bins is more than the 2**32 the sort keys can index")
        out["gwcorr"] = (float("nan") if tmin == tmax or ymin == ymax
                         else mom.cty / np.sqrt(mom.m2t * mom.m2y))
        k1, k5 = top_count(n, 1), top_count(n, 5)
        out.update(n_top1=k1, n_top5=k5)
        with ExternalSorter({"truth": np.float32, "rt2": np.int64, "flags": np.uint8},
                            **tkw) as by_imp:
            ss_t, straddle, mse1obs = _truth_order_pass(by_truth, by_imp, n, k1, k5)
            by_truth.close()
            res = _imp_order_pass(by_imp, straddle, n, k1, k5)
    out["mse1obs"] = mse1obs / k1
    out["mse1imp"] = res["mse1imp"] / k1
    out["gwspear"] = (float("nan") if ss_t == 0 or res["ss_i"] == 0
                      else res["cross"] / np.sqrt(ss_t * res["ss_i"]))
    out["auprc"], out["auroc"] = res["peaks"].auprc(), res["peaks"].auroc()
    out["match1"] = res["match"] / k1
    out["catch1obs"] = res["catch_obs"] / k1
    out["catch1imp"] = res["catch_imp"] / k1
    out["aucobs1"] = res["top1"].auroc()
    # Mann-Whitney: AUROC = (rank sum of positives - P(P+1)/2) / (P N), ascending mid ranks.
    out["aucimp1"] = _div(res["rank2_imp_top1"] / 2.0 - k1 * (k1 + 1) / 2.0, k1 * (n - k1))
    if person_chunks is not None:
        out["auprc_person"] = res["person"].auprc()
        out["person_frac"] = out["n_person"] / n
    else:
        out.pop("n_person")
    ordered = {m: float(out[m]) for m in METRICS}
    extra = {k: v for k, v in out.items() if k not in ordered}
    return {**ordered, **extra}


def _genome_pass(truth_chunks, imp_chunks, peak_chunks, region_chunks, person_chunks, sorter):
    mom = _Moments()
    s_all = s_fg = s_bg = 0.0
    n_fg = n_person = 0
    regions: dict[str, list] = {}
    region_names = None
    tmin = ymin = np.inf
    tmax = ymax = -np.inf
    pos = 0
    for t, y, p, r, q in _chunks(truth_chunks, imp_chunks, peak_chunks, region_chunks,
                                 person_chunks):
        if len(t) == 0:
            continue
        t64, y64 = t.astype(np.float64), y.astype(np.float64)
        d2 = (t64 - y64) ** 2
        s_all += float(d2.sum())
        s_fg += float(d2[p].sum())
        s_bg += float(d2[~p].sum())
        n_fg += int(p.sum())
        n_person += int(q.sum())
        if r is not None:
            if region_names is None:
                region_names = sorted(r)
                regions = {k: [0.0, 0] for k in region_names}
            elif sorted(r) != region_names:
                raise ValueError(f"region names change between chunks: {sorted(r)} != {region_names}")
            for k, mask in r.items():
                regions[k][0] += float(d2[mask].sum())
                regions[k][1] += int(mask.sum())
        mom.add(t64, y64)
        tmin, tmax = min(tmin, float(t.min())), max(tmax, float(t.max()))
        ymin, ymax = min(ymin, float(y.min())), max(ymax, float(y.max()))
        if pos + len(t) > MAX_INDEX:
            raise ValueError("more than 2**32 bins: the sort keys cannot index them")
        sorter.add(combined_keys(t, pos), imp=y,
                   flags=p.astype(np.uint8) * _PEAK | q.astype(np.uint8) * _PERSON)
        pos += len(t)
    n = mom.n
    out = {
        "mse": _div(s_all, n),
        "mse_fg": _div(s_fg, n_fg),
        "mse_bg": _div(s_bg, n - n_fg),
        "n_bins": n,
        "n_peaks": n_fg,
        "n_person": n_person,
    }
    for k, (s, c) in regions.items():
        out[f"mse_{k}"] = _div(s, c)
        out[f"n_{k}"] = c
    return out, mom, tmin, tmax, ymin, ymax


def _truth_order_pass(by_truth, by_imp, n, k1, k5):
    """Stream the truth's descending order: its top sets, the MSE on its top 1 %, its
    mid ranks' spread, and the sort by imputed value.

    The mid rank of a tie group spanning positions [a, b) is (a + 1 + b) / 2; the rank is
    carried as the integer ``rt2 = a + 1 + b``. A group still open at the end of a block
    gets ``-(a + 1)`` instead and its end b is recorded in ``straddle`` when it closes (at
    most one group per block, so that table stays tiny)."""
    pos = 0
    carry_vk, carry_start = None, 0
    ss = 0.0
    straddle: list[tuple[int, int]] = []
    mse1obs = 0.0

    def close(a, b):
        c = (a + 1 + b - (n + 1)) / 2.0
        return float(np.sum((b - a) * c * c))

    for keys, cols in by_truth.sorted_blocks():
        L = len(keys)
        vk = key_value_part(keys)
        tval = key_values(vk)
        imp = cols["imp"]
        n1, n5 = min(max(k1 - pos, 0), L), min(max(k5 - pos, 0), L)
        if n1:
            d = tval[:n1].astype(np.float64) - imp[:n1].astype(np.float64)
            mse1obs += float(np.sum(d * d))
        starts, cont = _segments(vk, carry_vk)
        gstart = pos + starts
        if cont:
            gstart[0] = carry_start
        elif carry_vk is not None:  # the open group ended with the previous block
            straddle.append((carry_start, pos))
            ss += close(np.array([carry_start]), np.array([pos]))
        gend = pos + np.append(starts[1:], L)
        if cont and len(starts) > 1:
            straddle.append((carry_start, int(gend[0])))
        rt2_seg = gstart + 1 + gend
        rt2_seg[-1] = -(gstart[-1] + 1)
        ss += close(gstart[:-1], gend[:-1])
        rt2 = np.repeat(rt2_seg, np.diff(np.append(starts, L)))
        flags = cols["flags"].copy()
        flags[:n1] |= _T1
        flags[:n5] |= _T5
        by_imp.add(combined_keys(imp, key_index(keys)), truth=tval, rt2=rt2, flags=flags)
        carry_vk, carry_start = vk[-1], int(gstart[-1])
        pos += L
    if pos != n:
        raise RuntimeError(f"the truth sort returned {pos} of {n} bins")
    straddle.append((carry_start, n))
    ss += close(np.array([carry_start]), np.array([n]))
    return ss, np.array(straddle, dtype=np.int64).reshape(-1, 2), mse1obs


def _imp_order_pass(by_imp, straddle, n, k1, k5):
    """Stream the imputation's descending order: its top sets against the truth's, the
    AUCs over tie groups, and Spearman's rank cross-product."""
    pos = 0
    peaks, top1, person = _Curve(), _Curve(), _Curve()
    cross = ss_i = mse1imp = 0.0
    match = catch_obs = catch_imp = rank2_imp_top1 = 0
    carry_vk = None
    carry = np.zeros(5, dtype=np.int64)  # start, sum of 2(rT - m), peaks, truth-top1, person
    s_starts, s_ends = straddle[:, 0], straddle[:, 1]

    def close(a, b, c2, tp, t1, tq):
        nonlocal cross, ss_i
        size = b - a
        ci2 = a + 1 + b - (n + 1)  # 2 (rI - m)
        cross += float(np.sum(ci2.astype(np.float64) * c2)) / 4.0
        ss_i += float(np.sum(size * (ci2 / 2.0) ** 2))
        peaks.add(tp, size - tp)
        top1.add(t1, size - t1)
        person.add(tq, size - tq)

    for keys, cols in by_imp.sorted_blocks():
        L = len(keys)
        vk = key_value_part(keys)
        ival = key_values(vk)
        tval, rt2, flags = cols["truth"], cols["rt2"], cols["flags"]
        open_ = rt2 < 0
        if open_.any():
            a = -rt2[open_] - 1
            j = np.searchsorted(s_starts, a)
            if not np.array_equal(s_starts[np.minimum(j, len(s_starts) - 1)], a):
                raise RuntimeError("a truth tie group has no recorded end")
            rt2 = rt2.copy()
            rt2[open_] = a + 1 + s_ends[j]
        is_peak = (flags & _PEAK) != 0
        is_t1 = (flags & _T1) != 0
        is_person = (flags & _PERSON) != 0
        n1, n5 = min(max(k1 - pos, 0), L), min(max(k5 - pos, 0), L)
        if n1:
            match += int(is_t1[:n1].sum())
            catch_imp += int(((flags[:n1] & _T5) != 0).sum())
            d = tval[:n1].astype(np.float64) - ival[:n1].astype(np.float64)
            mse1imp += float(np.sum(d * d))
            rank2_imp_top1 += int(np.sum(2 * (n + 1) - rt2[:n1]))
        if n5:
            catch_obs += int(is_t1[:n5].sum())
        starts, cont = _segments(vk, carry_vk)
        c2 = np.add.reduceat(rt2 - (n + 1), starts)
        tp = np.add.reduceat(is_peak.astype(np.int64), starts)
        t1 = np.add.reduceat(is_t1.astype(np.int64), starts)
        tq = np.add.reduceat(is_person.astype(np.int64), starts)
        gstart = pos + starts
        if cont:
            gstart[0] = carry[0]
            c2[0] += carry[1]
            tp[0] += carry[2]
            t1[0] += carry[3]
            tq[0] += carry[4]
        elif carry_vk is not None:  # the open group ended with the previous block
            close(carry[:1], np.array([pos]), *carry[1:, None])
        gend = pos + np.append(starts[1:], L)
        close(gstart[:-1], gend[:-1], c2[:-1], tp[:-1], t1[:-1], tq[:-1])
        carry = np.array([gstart[-1], c2[-1], tp[-1], t1[-1], tq[-1]], dtype=np.int64)
        carry_vk = vk[-1]
        pos += L
    if pos != n:
        raise RuntimeError(f"the imputation sort returned {pos} of {n} bins")
    close(carry[:1], np.array([n]), *carry[1:, None])
    return dict(cross=cross, ss_i=ss_i, mse1imp=mse1imp, match=match, catch_obs=catch_obs,
                catch_imp=catch_imp, rank2_imp_top1=rank2_imp_top1, peaks=peaks, top1=top1,
                person=person)


def metrics_from_arrays(
    truth: np.ndarray,
    imp: np.ndarray,
    peaks: np.ndarray | None = None,
    regions: dict[str, np.ndarray] | None = None,
    chunk_size: int | None = None,
    person: np.ndarray | None = None,
    **kwargs,
) -> dict:
    """:func:`track_metrics` of in-memory arrays (genome order), cut into chunks of
    ``chunk_size`` bins (one chunk by default).

    Parameters
    ----------
    truth, imp : np.ndarray, shape (n,)
    peaks : np.ndarray, shape (n,), bool, optional
    regions : dict[str, np.ndarray of shape (n,)], optional
    person : np.ndarray, shape (n,), bool, optional
        Person-specific peak bins (``auprc_person``).
    **kwargs
        Passed to :func:`track_metrics` (``run_size``, ``merge_size``, ``tmpdir``).
    """
    truth, imp = np.asarray(truth).reshape(-1), np.asarray(imp).reshape(-1)
    if truth.shape != imp.shape:
        raise ValueError(f"truth has {truth.size} bins, imputation {imp.size}")
    step = chunk_size or max(len(truth), 1)
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cuts = [slice(s, s + step) for s in range(0, len(truth), step)]
    return track_metrics(
        (truth[c] for c in cuts),
        (imp[c] for c in cuts),
        None if peaks is None else (np.asarray(peaks)[c] for c in cuts),
        None if regions is None else ({k: np.asarray(v)[c] for k, v in regions.items()}
                                      for c in cuts),
        None if person is None else (np.asarray(person)[c] for c in cuts),
        **kwargs,
    )
