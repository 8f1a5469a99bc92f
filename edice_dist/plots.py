"""Evaluation plots (PNG, matplotlib's Agg canvas; pyplot and its global state are not used).

- ``metrics_by_assay.png``: per assay, the mean of each metric for the model and the
  baselines (bars);
- ``scatter_model_vs_<baseline>.png``: per track, the model's value against the
  baseline's, one panel per metric, with the diagonal;
- ``browser_<track_id>.png``: a genome-browser panel of the truth, the imputation and the
  baselines over a window around the truth's highest bin of the first chromosome, peak
  bins shaded.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
from matplotlib.figure import Figure

from . import storage
from .metrics import lower_is_better

COLORS = {"truth": "#222222", "model": "#1f77b4", "finetuned": "#1f77b4", "others": "#9467bd",
          "alldonors": "#8c564b", "AVG": "#ff7f0e", "TrackAVG": "#2ca02c"}
"""Per method (the model of ``edice evaluate``; the models of ``edice personal``; the
baselines)."""
BROWSER_BINS = 2000
"""Width of the browser window (50 kb at 25 bp)."""
MAX_BROWSERS = 6
"""Browser panels drawn (first truth tracks in manifest order)."""


def _save(fig: Figure, path: str) -> str:
    """Write aside, then move into place (upload for URLs)."""
    if storage.is_url(path):
        with tempfile.TemporaryDirectory(prefix="edice-plot-") as tmp:
            local = os.path.join(tmp, storage.basename(path))
            fig.savefig(local, dpi=100)
            storage.upload(local, path)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def assay_bars(summary: list[dict], metrics: list[str], path: str) -> str:
    """Bars of the per-assay means, one panel per metric, one bar per method."""
    assays = [a for a in dict.fromkeys(s["assay"] for s in summary)]
    methods = [m for m in COLORS if any(s["method"] == m for s in summary)]
    idx = {(s["assay"], s["method"], s["metric"]): s["mean"] for s in summary}
    rows, cols = _grid(len(metrics))
    fig = Figure(figsize=(4.2 * cols, 2.9 * rows))
    # A fixed layout: constrained layout costs seconds with this many panels.
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.75 / (2.9 * rows), bottom=0.9 / (2.9 * rows),
                        hspace=0.75, wspace=0.25)
    x = np.arange(len(assays))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        for j, meth in enumerate(methods):
            vals = [idx.get((a, meth, m), np.nan) for a in assays]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=meth,
                   color=COLORS[meth])
        ax.set_title(m + (" (lower is better)" if lower_is_better(m) else ""), fontsize=9)
        ax.set_xticks(x, assays, rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Mean over tracks per assay")
    return _save(fig, path)


def model_vs_baseline(rows: list[dict], metrics: list[str], baseline: str, path: str,
                      model: str = "model") -> str:
    """Per-track scatter of the ``model`` method against ``baseline``, one panel per
    metric."""
    base = {(r["cell_key"], r["assay"]): r for r in rows if r["method"] == baseline}
    pairs = [(r, base[(r["cell_key"], r["assay"])]) for r in rows
             if r["method"] == model and (r["cell_key"], r["assay"]) in base]
    assays = sorted({r["assay"] for r, _ in pairs})
    palette = {a: f"C{i % 10}" for i, a in enumerate(assays)}
    nrows, cols = _grid(len(metrics))
    fig = Figure(figsize=(3.4 * cols, 3.2 * nrows))
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.8 / (3.2 * nrows),
                        bottom=0.5 / (3.2 * nrows), hspace=0.5, wspace=0.35)
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, k + 1)
        xs = np.array([b.get(m, np.nan) for _, b in pairs], dtype=float)
        ys = np.array([a.get(m, np.nan) for a, _ in pairs], dtype=float)
        for a in assays:
            sel = np.array([r["assay"] == a for r, _ in pairs])
            ax.scatter(xs[sel], ys[sel], s=14, color=palette[a], label=a)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if ok.any():
            lo, hi = min(xs[ok].min(), ys[ok].min()), max(xs[ok].max(), ys[ok].max())
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel(baseline, fontsize=8)
        ax.set_ylabel(model, fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0 and assays:
            ax.legend(fontsize=6)
    fig.suptitle(f"Per track: {model} vs {baseline}")
    return _save(fig, path)


def method_summary(summaries: dict[str, list[dict]], path: str, methods,
                   metrics=("auprc_person", "mse", "gwcorr")) -> str:
    """Bars of each method's mean over all tracks, one row of panels per summary (e.g. per
    workflow), one panel per metric; the person-specific AUPRC panel draws its chance
    level (the mean share of person-specific bins) as a dashed line.

    Parameters
    ----------
    summaries : label -> the rows of :func:`edice_dist.tables.summarise`.
    methods : the methods, in the order drawn.
    """
    nrows, cols = len(summaries), len(metrics)
    fig = Figure(figsize=(3.6 * cols, 2.8 * nrows + 0.4))
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.55 / (2.8 * nrows + 0.4),
                        bottom=0.75 / (2.8 * nrows + 0.4), hspace=0.75, wspace=0.3)
    for i, (label, summary) in enumerate(summaries.items()):
        idx = {(s["method"], s["metric"]): s["mean"] for s in summary if s["assay"] == "all"}
        shown = [m for m in methods if (m, metrics[0]) in idx]
        for j, metric in enumerate(metrics):
            ax = fig.add_subplot(nrows, cols, i * cols + j + 1)
            vals = [idx.get((m, metric), np.nan) for m in shown]
            ax.bar(range(len(shown)), vals, color=[COLORS.get(m, "0.5") for m in shown])
            for x, v in enumerate(vals):
                if np.isfinite(v):
                    ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
            chance = idx.get((shown[0], "person_frac"), np.nan) if shown else np.nan
            if metric == "auprc_person" and np.isfinite(chance):
                ax.axhline(chance, color="0.3", ls="--", lw=1, label=f"chance {chance:.4f}")
                ax.legend(fontsize=7, loc="upper right")
            ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{label}: {metric}" + (" (lower is better)"
                                                 if lower_is_better(metric) else ""), fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
    return _save(fig, path)


def browser(panel: dict[str, np.ndarray], chrom: str, start_bin: int, bin_size: int,
            path: str, peaks: np.ndarray | None = None, title: str = "",
            ylabel: str = "") -> str:
    """Stacked signal tracks over one window.

    Parameters
    ----------
    panel : dict[str, np.ndarray of shape (w,)]
        Label -> values, drawn top to bottom (``truth`` first).
    peaks : np.ndarray, shape (w,), bool, optional
        Peak bins of the truth, shaded on every track.
    """
    w = len(next(iter(panel.values())))
    x = (start_bin + np.arange(w)) * bin_size
    fig = Figure(figsize=(11, 1.3 * len(panel) + 0.8))
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.4 / (1.3 * len(panel) + 0.8),
                        bottom=0.5 / (1.3 * len(panel) + 0.8), hspace=0.15)
    axes = fig.subplots(len(panel), 1, sharex=True, squeeze=False)[:, 0]
    top = max(float(np.max(v)) for v in panel.values()) or 1.0
    for ax, (label, v) in zip(axes, panel.items(), strict=True):
        ax.fill_between(x, 0, v, step="post", color=COLORS.get(label, "0.4"), lw=0)
        if peaks is not None and peaks.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], peaks.astype(np.int8), [0]))))
            for a, b in zip(edges[::2], edges[1::2], strict=True):
                ax.axvspan(x[a], x[a] + (b - a) * bin_size, color="0.85", zorder=0, lw=0)
        ax.set_ylim(0, top * 1.05)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel(f"{chrom} position (bp)" + (f"; values in {ylabel}" if ylabel else ""),
                        fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def write_all(out: str, rows: list[dict], summary: list[dict], metrics: list[str],
              browsers: list[dict]) -> dict[str, str]:
    """Every plot of an evaluation; returns ``{file name: path}``.

    ``browsers`` are the genome-browser panels to draw, each a dict of ``track_id`` and the
    arguments of :func:`browser` (see :func:`edice_dist.evaluate.run_jobs`).
    """
    files = {"metrics_by_assay.png": assay_bars(summary, metrics,
                                                storage.join(out, "metrics_by_assay.png"))}
    for baseline in ("AVG", "TrackAVG"):
        if any(r["method"] == baseline for r in rows):
            name = f"scatter_model_vs_{baseline}.png"
            files[name] = model_vs_baseline(rows, metrics, baseline, storage.join(out, name))
    for b in browsers:
        name = f"browser_{b['track_id']}.png"
        files[name] = browser(b["panel"], b["chrom"], b["start_bin"], b["bin_size"],
                              storage.child(out, name, what=f"track id {b['track_id']}"),
                              peaks=b["peaks"], title=b["title"],
                              ylabel=b["ylabel"])
    return files
