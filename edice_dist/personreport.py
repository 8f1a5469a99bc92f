"""The tables, plots and report page of a personalised-imputation workflow
(:mod:`edice_dist.personal`), from the ``metrics.json`` of its evaluate units.

The numbers are per hidden track and method, as ``edice evaluate`` computes them
(:func:`edice_dist.metrics.track_metrics`), with ``auprc_person`` and its chance level
``person_frac``; the means and the "finetuned beats X" shares are
:func:`edice_dist.tables.summarise`'s, with the fine-tuned model as the reference.
"""

from __future__ import annotations

import json

from . import __version__, storage
from .personunit import KINDS
from .tables import format_table, metric_columns, summarise, write_tables

METHODS = KINDS + ("AVG", "TrackAVG")
"""The methods of the tables: the models of a fold, then the baselines."""
REFERENCE = "finetuned"
"""The method the tables compare every other one with ("finetuned beats X")."""
HEADLINE = ("auprc_person", "person_frac", "mse", "gwcorr", "auprc")
"""The columns of the printed table and of the summary plot."""


def read_rows(out: str, units) -> tuple[list[dict], dict[str, str]]:
    """Every evaluate unit's rows (NaN for missing values) and browser PNGs by track."""
    rows, browsers = [], {}
    for u in units:
        if u.kind != "evaluate":
            continue
        doc = json.loads(storage.read_text(storage.join(out, u.folder, "metrics.json")))
        rows += [{k: float("nan") if v is None else v for k, v in r.items()} for r in doc["rows"]]
        browsers.update(doc.get("plots", {}))
    return rows, browsers


def _sections(out: str, workflow: str) -> list:
    doc = json.loads(storage.read_text(storage.join(out, "personal.json")))
    store = doc.get("store", {})
    opts = ", ".join(f"{k}={v}" for k, v in (doc.get("options") or {}).items())
    cfg = ", ".join(f"{k}={v}" for k, v in (doc.get("train_config") or {}).items())
    return [("Workflow", [
        ("workflow", workflow), ("folder", out), ("units", str(len(doc.get("units", [])))),
        ("options", opts), ("training config (others, alldonors)", cfg),
        ("values", "arcsinh(-log10 p) of the store; truth = the hidden observed track"),
        ("person-specific peaks", "peaks of the donor's track that no other donor's track "
                                  "of the same cell type and assay has, runs >= 150 bp"),
        ("written by", f"edice-dist {__version__}"),
    ]), ("Track store", [("store", str(store.get("path", ""))),
                         ("tracks", str(len(store.get("tracks", []))))])]


def collect(out: str, workflow: str, units, plots: bool = True, quiet: bool = False) -> dict:
    """Write ``metrics.tsv``, ``summary.tsv``, ``metrics.json``, the plots and
    ``report.html`` into ``out``; print the headline table.

    Returns
    -------
    dict
        ``rows``, ``summary``, ``files`` (name -> path) and ``table``.
    """
    rows, browsers = read_rows(out, units)
    metrics = metric_columns(rows)
    summary = summarise(rows, metrics, METHODS, REFERENCE)
    cols = ["donor", "fold", "cell_type", "individual", "assay", "method"] + metrics
    doc = {"tool": "edice-dist", "tool_version": __version__, "workflow": workflow,
           "space": "arcsinh", "reference": REFERENCE, "metrics": metrics}
    files = write_tables(out, cols, rows, summary, doc)
    captions = {}
    if plots:
        from . import plots as _plots

        name = "person_summary.png"
        files[name] = _plots.method_summary({workflow: summary}, storage.join(out, name),
                                            METHODS)
        captions[name] = ("Mean over hidden tracks per method; person-specific AUPRC with its "
                          "chance level (the share of person-specific bins) dashed.")
        files["metrics_by_assay.png"] = _plots.assay_bars(
            summary, metrics, storage.join(out, "metrics_by_assay.png"))
        scores = [m for m in HEADLINE if m in metrics and m != "person_frac"]
        for base in ("TrackAVG", "AVG", "others", "alldonors"):
            if any(r["method"] == base for r in rows):
                name = f"scatter_{REFERENCE}_vs_{base}.png"
                files[name] = _plots.model_vs_baseline(rows, scores, base,
                                                       storage.join(out, name), REFERENCE)
                captions[name] = (f"Per hidden track: {REFERENCE} (y) against {base} (x); "
                                  "above the diagonal it scores higher.")
        for tid, path in list(browsers.items())[:_plots.MAX_BROWSERS]:
            files[f"browser_{tid}.png"] = path
            captions[f"browser_{tid}.png"] = (
                f"{tid} hidden: the observed track, the models and the baselines around its "
                "strongest person-specific peak (shaded: person-specific peak bins).")
    from .report import write_report

    files["report.html"] = write_report(
        out, rows, summary, metrics, {n: p for n, p in files.items() if n.endswith(".png")},
        doc, out, title=f"Personalised imputation: {workflow}", reference=REFERENCE,
        sections=_sections(out, workflow), captions=captions)
    shown = [m for m in HEADLINE if m in metrics]
    table = format_table([s for s in summary if s["metric"] in shown], shown, METHODS,
                         REFERENCE)
    if not quiet:
        print(table, flush=True)
    return {"rows": rows, "summary": summary, "files": files, "table": table}
