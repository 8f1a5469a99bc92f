"""Does the spread of ``edice impute --uncertainty`` mean something? Calibration and cost.

    python benchmarks/bench_uncertainty.py CONSORTIUM_DIR [--samples 8] [--chroms chr3]
        [--out DIR]

``CONSORTIUM_DIR`` is one consortium folder of ``benchmarks/bench_accuracy.py`` (``store``,
``consortium/truth/targets.tsv`` and the trained ``default/model``). The held-out tracks are
imputed twice, without and with spreads, one run after the other (the cost ratio); then,
over every bin of every held-out track, in arcsinh space:

- the squared error of the imputation by decile of its spread (the calibration table);
- the rank correlation between spread and absolute error, over bins and over tracks;
- per assay, the mean spread beside the MSE, to see whether the spread flags the marks
  the model does worst on (the broad ones among them).

Reads the truth and the bigWigs through the same readers as ``edice evaluate``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BROAD = ("H3K9me3", "H3K27me3")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def _impute(store: str, model: str, truth: str, run: str, samples: int, chroms) -> float:
    from edice_dist.impute import impute

    t = time.perf_counter()
    impute(store, model, run, targets=truth, chroms=chroms, hub=False, space="arcsinh",
           uncertainty=samples, export=True)
    return time.perf_counter() - t


def _read(truth: str, bw_dir: str, store: str, chroms):
    """Per held-out track: (assay, truth, imputed, spread) as flat arcsinh arrays."""
    from edice_dist import spaces
    from edice_dist.runfolder import bigwig_name, spread_name
    from edice_dist.sources import open_source
    from edice_dist.store import open_store
    from edice_dist.truth import read_truth

    genome = open_store(store).genome.subset(chroms)
    out = []
    for t in read_truth(truth):
        parts = []
        for path, space in ((t.path, "pval"), (os.path.join(bw_dir, bigwig_name(t.track_id)), "arcsinh"),
                            (os.path.join(bw_dir, spread_name(t.track_id)), "arcsinh")):
            with open_source(path, genome, label=t.track_id) as src:
                v = np.concatenate([src.binned(c, 0, genome.n_bins(c)) for c in genome.chroms])
            parts.append(spaces.to_space(v, "arcsinh", space, np.float64))
        out.append((t.assay, *parts))
    return out


def calibration(tracks, n_groups: int = 10) -> dict:
    """Squared error by spread decile over all bins, and the rank correlations."""
    y = np.concatenate([t[1] for t in tracks])
    m = np.concatenate([t[2] for t in tracks])
    s = np.concatenate([t[3] for t in tracks])
    err = (m - y) ** 2
    edges = np.quantile(s, np.linspace(0, 1, n_groups + 1))
    group = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_groups - 1)
    rows = []
    for g in range(n_groups):
        sel = group == g
        rows.append({"decile": g + 1, "spread": float(s[sel].mean()), "mse": float(err[sel].mean()),
                     "rmse": float(np.sqrt(err[sel].mean())), "bins": int(sel.sum())})
    per_track = [(float(np.mean(t[3])), float(np.mean((t[2] - t[1]) ** 2)), t[0]) for t in tracks]
    assays = sorted({a for _, _, a in per_track})
    by_assay = {a: (float(np.mean([p[0] for p in per_track if p[2] == a])),
                    float(np.mean([p[1] for p in per_track if p[2] == a]))) for a in assays}
    return {"deciles": rows, "bins_spearman": _spearman(s, np.abs(m - y)),
            "tracks_spearman": _spearman(np.array([p[0] for p in per_track]),
                                         np.array([p[1] for p in per_track])),
            "by_assay": by_assay, "n_tracks": len(tracks), "n_bins": int(len(y))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("consortium", help="a consortium folder of bench_accuracy.py")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--chroms", nargs="+", help="chromosomes to impute and score (default: all)")
    ap.add_argument("--out", default=None, help="run folders (default: CONSORTIUM/uncertainty)")
    a = ap.parse_args(argv)
    from edice_dist import raycluster

    c = a.consortium
    store, model = os.path.join(c, "store"), os.path.join(c, "default", "model")
    truth = os.path.join(c, "consortium", "truth", "targets.tsv")
    out = a.out or os.path.join(c, "uncertainty" + "".join(f"_{x}" for x in a.chroms or []))
    raycluster.init()
    print(f"# bench_uncertainty: {_dt.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {c}, {a.samples} Monte Carlo samples, chromosomes "
          f"{a.chroms or 'all'}", flush=True)
    plain = _impute(store, model, truth, os.path.join(out, "plain"), 0, a.chroms)
    mc = _impute(store, model, truth, os.path.join(out, f"mc{a.samples}"), a.samples, a.chroms)
    print(f"impute + export of the held-out tracks: {plain:.1f} s without spreads, {mc:.1f} s "
          f"with {a.samples} samples: {mc / plain:.2f}x")
    r = calibration(_read(truth, os.path.join(out, f"mc{a.samples}", "bigwig"), store, a.chroms))
    print(f"\nerror by spread decile over {r['n_bins']:,} bins of {r['n_tracks']} held-out tracks "
          "(arcsinh space)\n")
    print("| spread decile | mean spread | MSE | RMSE |\n|---|---|---|---|")
    for row in r["deciles"]:
        print(f"| {row['decile']} | {row['spread']:.3f} | {row['mse']:.3f} | {row['rmse']:.3f} |")
    print(f"\nSpearman(spread, |error|) over bins: {r['bins_spearman']:.3f}; "
          f"over tracks (mean spread vs MSE): {r['tracks_spearman']:.3f}\n")
    print("| assay | mean spread | MSE |\n|---|---|---|")
    for assay, (sp, mse) in sorted(r["by_assay"].items(), key=lambda kv: -kv[1][0]):
        print(f"| {assay}{' (broad)' if assay in BROAD else ''} | {sp:.3f} | {mse:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
