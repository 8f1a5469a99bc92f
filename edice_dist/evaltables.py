"""The tables of `edice evaluate`: metric columns, means per assay and method, how often
the model beats each baseline, and their TSV and stdout forms (:mod:`edice_dist.evaluate`
computes the rows)."""

from __future__ import annotations

import math
import operator

import numpy as np

from .metrics import METRICS, REGIONS, lower_is_better

METHODS = ("model", "AVG", "TrackAVG")


def metric_columns(rows: list[dict]) -> list[str]:
    """:data:`METRICS`, then the region MSEs present in ``rows``."""
    extra = {k for r in rows for k in r if k.startswith("mse_") and k not in METRICS}
    known = [f"mse_{r}" for r in REGIONS if f"mse_{r}" in extra]
    return list(METRICS) + known + sorted(extra - set(known))


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Means per assay (and ``all``) and method, skipping NaN (``n`` = tracks used), and
    for each baseline the share of tracks on which the model is strictly better.

    Returns
    -------
    list of dict
        Keys ``assay method metric n mean model_beats n_paired``; ``model_beats`` and
        ``n_paired`` are None on model rows.
    """
    key = operator.itemgetter("cell_key", "assay")
    model = {key(r): r for r in rows if r["method"] == "model"}
    out = []
    for assay in sorted({r["assay"] for r in rows}) + ["all"]:
        for method in METHODS:
            sel = [r for r in rows if r["method"] == method and assay in (r["assay"], "all")]
            if not sel:
                continue
            for m in metrics:
                vals = np.array([r.get(m, np.nan) for r in sel], dtype=np.float64)
                ok = np.isfinite(vals)
                row = {"assay": assay, "method": method, "metric": m, "n": int(ok.sum()),
                       "mean": float(vals[ok].mean()) if ok.any() else float("nan"),
                       "model_beats": None, "n_paired": None}
                if method != "model":
                    pairs = [(model[key(r)].get(m, np.nan), r.get(m, np.nan)) for r in sel
                             if key(r) in model]
                    pairs = [(a, b) for a, b in pairs if np.isfinite(a) and np.isfinite(b)]
                    wins = sum((a < b) if lower_is_better(m) else (a > b) for a, b in pairs)
                    row["n_paired"] = len(pairs)
                    row["model_beats"] = wins / len(pairs) if pairs else float("nan")
                out.append(row)
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def tsv(columns: list[str], rows: list[dict]) -> str:
    lines = ["\t".join(columns)]
    lines += ["\t".join(_fmt(r.get(c)) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def format_table(summary: list[dict], metrics: list[str]) -> str:
    """The stdout table: per assay, the mean of each metric per method, and the share of
    tracks on which the model beats each baseline."""
    idx = {(s["assay"], s["method"], s["metric"]): s for s in summary}
    short = {m: m.replace("mse_", "m_")[:9] for m in metrics}
    lines = [f"{'assay':<12} {'method':<14} {'n':>4} " + " ".join(f"{short[m]:>9}" for m in metrics)]
    for assay in dict.fromkeys(s["assay"] for s in summary):
        for method in METHODS:
            cells = [idx.get((assay, method, m)) for m in metrics]
            if cells[0] is None:
                continue
            n = max(c["n"] for c in cells if c)
            lines.append(f"{assay:<12} {method:<14} {n:>4} "
                         + " ".join(f"{c['mean']:>9.4f}" if c else " " * 9 for c in cells))
        for method in METHODS[1:]:
            cells = [idx.get((assay, method, m)) for m in metrics]
            if cells[0] is None:
                continue
            lines.append(f"{assay:<12} {'beats ' + method:<14} {cells[0]['n_paired']:>4} "
                         + " ".join(f"{100 * c['model_beats']:>8.0f}%"
                                    if c and np.isfinite(c["model_beats"]) else f"{'-':>9}"
                                    for c in cells))
        lines.append("")
    lines.append("mean over tracks (NaN skipped; n = tracks); 'beats X' = % of tracks on which "
                 "the model is better than X (lower mse*, higher otherwise)")
    return "\n".join(lines)
