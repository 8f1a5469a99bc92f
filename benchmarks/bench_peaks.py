"""Why peaks are imputed worse than averaging: calibration at peaks, per assay and signal level.

    python benchmarks/bench_peaks.py --truth SIM/truth/targets.tsv --store STORE \\
        --imputed NAME=RUN/bigwig [NAME=RUN/bigwig ...] [--json OUT]

For every held-out truth track and every method (each ``--imputed`` folder, and AVG from
the store), the bins inside the truth's peaks are grouped by the observed value (arcsinh
of -log10 p, levels ``LEVELS``). Per assay, method and level it prints the mean observed
and the mean predicted value, and splits the peak MSE into

- **shrinkage**: the squared mean error of each level, weighted by its bins: what a
  per-level recalibration (stretching the peaks back) would remove;
- **position**: the variance of the error within each level: which peak bins are high,
  their shape and place, that no rescaling can fix;

(shrinkage + position = peak MSE, exactly), and the slope of the prediction on the truth
at peaks (1: peak heights kept; below 1: peaks flattened toward the mean).

Streams every track in genome chunks through the evaluation's own readers
(:func:`edice_dist.evaluate.job_chunks`), so it runs on any genome size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LEVELS = (0.0, 1.0, 2.0, 3.0, 4.0, np.inf)
"""Edges of the observed-value levels (arcsinh(-log10 p); 1.44 is p = 0.01)."""


def accumulate(job) -> np.ndarray:
    """Per level: [bins, sum truth, sum pred, sum err^2, sum truth^2, sum truth*pred] over
    the job's peak bins; (n_levels, 6) float64."""
    from edice_dist.evaluate import job_chunks

    acc = np.zeros((len(LEVELS) - 1, 6))
    for t, y, p, _, _ in job_chunks(job):
        t, y = t[p].astype(np.float64), y[p].astype(np.float64)
        lev = np.digitize(t, LEVELS[1:-1])
        for i, col in enumerate((np.ones_like(t), t, y, (y - t) ** 2, t * t, t * y)):
            acc[:, i] += np.bincount(lev, weights=col, minlength=len(LEVELS) - 1)
    return acc


def summarise(acc: np.ndarray) -> dict:
    """Mean observed / predicted per level, the shrinkage / position split and the slope."""
    n, st, sp, se, stt, stp = acc.T
    total = n.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        bias = (sp - st) / n
        shrink = float(np.nansum(n * bias**2) / total)
        mse = float(se.sum() / total)
        mt, mp = st.sum() / total, sp.sum() / total
        slope = float((stp.sum() / total - mt * mp) / (stt.sum() / total - mt * mt))
        return {"bins": int(total), "mse_fg": mse, "shrinkage": shrink,
                "position": mse - shrink, "slope": slope,
                "levels": [{"bins": int(n[i]), "obs": float(st[i] / n[i]),
                            "pred": float(sp[i] / n[i])} if n[i] else None
                           for i in range(len(n))]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--imputed", nargs="+", required=True, metavar="NAME=DIR")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from edice_dist.evaluate import plan_jobs
    from edice_dist.store import open_store
    from edice_dist.truth import imputed_paths, read_truth

    truth = read_truth(a.truth)
    store = open_store(a.store)
    per: dict = {}  # (assay, method) -> accumulated levels
    for k, spec in enumerate(a.imputed):
        name, _, folder = spec.partition("=")
        preds = imputed_paths(folder, truth)
        jobs = plan_jobs(truth, preds, store.genome, "arcsinh",
                         store=store if k == 0 else None)
        for job in jobs:
            method = name if job.method == "model" else job.method
            key = (job.track.assay, method)
            per[key] = per.get(key, 0) + accumulate(job)
    methods = list(dict.fromkeys(m for _, m in per))
    edges = [f"{lo:g}-{hi:g}" for lo, hi in zip(LEVELS[:-1], LEVELS[1:], strict=True)]
    print("| assay | method | peak bins | peak MSE | shrinkage | position | slope | "
          + " | ".join(f"obs/pred {e}" for e in edges) + " |")
    print("|---" * (7 + len(edges)) + "|")
    out = {}
    for assay in sorted({a_ for a_, _ in per}):
        for method in methods:
            if (assay, method) not in per:
                continue
            s = summarise(per[(assay, method)])
            out[f"{assay}/{method}"] = s
            lv = " | ".join("" if v is None else f"{v['obs']:.2f}/{v['pred']:.2f}"
                            for v in s["levels"])
            print(f"| {assay} | {method} | {s['bins']} | {s['mse_fg']:.3f} | "
                  f"{s['shrinkage']:.3f} | {s['position']:.3f} | {s['slope']:.2f} | {lv} |")
    for method in methods:
        s = summarise(sum(v for (_, m), v in per.items() if m == method))
        out[f"all/{method}"] = s
        print(f"| all | {method} | {s['bins']} | {s['mse_fg']:.3f} | {s['shrinkage']:.3f} | "
              f"{s['position']:.3f} | {s['slope']:.2f} | "
              + " | ".join("" if v is None else f"{v['obs']:.2f}/{v['pred']:.2f}"
                           for v in s["levels"]) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
