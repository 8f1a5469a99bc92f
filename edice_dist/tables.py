"""Metric tables of an evaluation: per track and method rows, means per assay and method,
the share of tracks on which the model beats each other method, and their files
(``metrics.tsv``, ``summary.tsv``, ``metrics.json``) and stdout table.

Used by ``edice evaluate`` (:mod:`edice_dist.evaluate`: the model against AVG and
TrackAVG) and by ``edice personal`` (:mod:`edice_dist.personreport`: several models).
"""

from __future__ import annotations

import json
import math
import operator

import numpy as np

from . import storage
from .metrics import METRICS, PERSON_METRICS, REGIONS, TRUTH_METRICS, lower_is_better

METHODS = ("model", "AVG", "TrackAVG")
"""The methods of ``edice evaluate``, in table order."""


def json_number(v):
    """A value as JSON can hold it: a non-finite float becomes None (null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def metric_columns(rows: list[dict]) -> list[str]:
    """:data:`METRICS`, then the region MSEs and the person-specific AUPRC and its chance
    level present in ``rows``."""
    extra = {k for r in rows for k in r if k.startswith("mse_") and k not in METRICS}
    known = [f"mse_{r}" for r in REGIONS if f"mse_{r}" in extra]
    person = [k for k in PERSON_METRICS if any(k in r for r in rows)]
    return list(METRICS) + known + sorted(extra - set(known)) + person


def summarise(rows: list[dict], metrics: list[str], methods: tuple[str, ...] = METHODS,
              reference: str = "model") -> list[dict]:
    """Means per assay (and ``all``) and method, skipping NaN (``n`` = tracks used), and
    for each other method the share of tracks on which the ``reference`` method (the
    model) is strictly better.

    Returns
    -------
    list of dict
        Keys ``assay method metric n mean model_beats n_paired``; ``model_beats`` and
        ``n_paired`` are None on the reference's rows, and for a metric that describes the
        truth rather than the method (``person_frac``, a chance level).
    """
    key = operator.itemgetter("cell_key", "assay")
    model = {key(r): r for r in rows if r["method"] == reference}
    out = []
    for assay in sorted({r["assay"] for r in rows}) + ["all"]:
        for method in methods:
            sel = [r for r in rows if r["method"] == method and assay in (r["assay"], "all")]
            if not sel:
                continue
            for m in metrics:
                vals = np.array([r.get(m, np.nan) for r in sel], dtype=np.float64)
                ok = np.isfinite(vals)
                row = {"assay": assay, "method": method, "metric": m, "n": int(ok.sum()),
                       "mean": float(vals[ok].mean()) if ok.any() else float("nan"),
                       "model_beats": None, "n_paired": None}
                if method != reference and m not in TRUTH_METRICS:
                    pairs = [(model[key(r)].get(m, np.nan), r.get(m, np.nan)) for r in sel
                             if key(r) in model]
                    pairs = [(a, b) for a, b in pairs if np.isfinite(a) and np.isfinite(b)]
                    wins = sum((a < b) if lower_is_better(m) else (a > b) for a, b in pairs)
                    row["n_paired"] = len(pairs)
                    row["model_beats"] = wins / len(pairs) if pairs else float("nan")
                out.append(row)
    return out


def write_tables(out: str, cols: list[str], rows: list[dict], summary: list[dict],
                 doc: dict) -> dict[str, str]:
    """Write ``metrics.tsv`` (``cols`` of ``rows``), ``summary.tsv`` and ``metrics.json``
    (``doc`` with the rows and the summary, NaN as null) into ``out``.

    Returns
    -------
    dict
        File name -> path.
    """
    files = {"metrics.tsv": storage.join(out, "metrics.tsv"),
             "summary.tsv": storage.join(out, "summary.tsv"),
             "metrics.json": storage.join(out, "metrics.json")}
    storage.write_text_atomic(files["metrics.tsv"], _tsv(cols, rows))
    storage.write_text_atomic(files["summary.tsv"], _tsv(
        ["assay", "method", "metric", "n", "mean", "model_beats", "n_paired"], summary))
    doc = {**doc, "tracks": [{k: json_number(v) for k, v in r.items()} for r in rows],
           "summary": [{k: json_number(v) for k, v in s.items()} for s in summary]}
    storage.write_text_atomic(files["metrics.json"], json.dumps(doc, indent=1) + "\n")
    return files


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _tsv(columns: list[str], rows: list[dict]) -> str:
    lines = ["\t".join(columns)]
    lines += ["\t".join(_fmt(r.get(c)) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def format_table(summary: list[dict], metrics: list[str], methods: tuple[str, ...] = METHODS,
                 reference: str = "model") -> str:
    """The stdout table: per assay, the mean of each metric per method, and the share of
    tracks on which the model (``reference``) beats each other method."""
    idx = {(s["assay"], s["method"], s["metric"]): s for s in summary}
    short = {m: m.replace("mse_", "m_")[:9] for m in metrics}
    lines = [f"{'assay':<12} {'method':<14} {'n':>4} " + " ".join(f"{short[m]:>9}" for m in metrics)]
    for assay in dict.fromkeys(s["assay"] for s in summary):
        for method in methods:
            cells = [idx.get((assay, method, m)) for m in metrics]
            if cells[0] is None:
                continue
            n = max(c["n"] for c in cells if c)
            lines.append(f"{assay:<12} {method:<14} {n:>4} "
                         + " ".join(f"{c['mean']:>9.4f}" if c else " " * 9 for c in cells))
        for method in methods:
            cells = [idx.get((assay, method, m)) for m in metrics]
            if method == reference or cells[0] is None:
                continue
            lines.append(f"{assay:<12} {'beats ' + method:<14} {cells[0]['n_paired']:>4} "
                         + " ".join(f"{100 * c['model_beats']:>8.0f}%"
                                    if c and c["model_beats"] is not None
                                    and np.isfinite(c["model_beats"]) else f"{'-':>9}"
                                    for c in cells))
        lines.append("")
    lines.append("mean over tracks (NaN skipped; n = tracks); 'beats X' = % of tracks on which "
                 f"{'the model' if reference == 'model' else reference} is better than X "
                 "(lower mse*, higher otherwise)")
    return "\n".join(lines)
