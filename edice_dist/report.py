"""The report page of an evaluation: ``report.html``, one self-contained file that a
person opens in any browser, offline, or attaches to an e-mail.

It holds, in this order: the mean of every metric per assay and method with the best
method of each assay highlighted per metric (lower is better for the ``mse*`` metrics,
higher for the others) and the share of tracks on which the model beats each baseline;
the plots, embedded as PNG data URIs; the per-track rows, best method per track
highlighted; and the provenance of the numbers: what was evaluated, the imputation run
(``run.json`` beside the imputed folder), its model (``model.json``), its track store
(the store's root attributes), and the software versions. What is not available to the
evaluation (bigWigs evaluated outside a run folder, a store on a machine out of reach)
is said, not guessed. No external style sheet, script or font is used.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import importlib.metadata
import json
import math
import platform

from . import __version__, runfolder, storage
from .metrics import TRUTH_METRICS, lower_is_better

REPORT = "report.html"
METHOD_ORDER = ("model", "finetuned", "others", "alldonors", "AVG", "TrackAVG")
SOFTWARE = ("numpy", "zarr", "pyBigWig", "matplotlib", "ray", "torch", "fsspec")
"""Packages whose versions the page lists (read from their metadata, not imported)."""

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #222; margin: 0 auto; padding: 1.2em 2em 3em; max-width: 1400px; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
h2 { font-size: 1.2em; margin: 1.6em 0 .5em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; margin: 1em 0 .3em; }
p.lead { color: #555; margin: 0 0 1em; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .3em 0 1em; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e6e6e6; text-align: right;
         white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; font-weight: 600; }
td.k, th.k { text-align: left; }
tr.group td { border-top: 2px solid #bbb; }
tr.beats td { color: #666; font-style: italic; }
td.best { background: #cdeccd; font-weight: 700; }
.scroll { overflow-x: auto; }
figure { margin: 0 0 1.5em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 0; }
dt { color: #555; } dd { margin: 0; word-break: break-all; }
.note { color: #8a5a00; }
.legend span.best { background: #cdeccd; font-weight: 700; padding: 0 4px; }
"""


# ----------------------------------------------------------------------------- values


def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def best_methods(rows: list[dict], metric: str) -> set[int]:
    """Indices into ``rows`` of the best value of ``metric`` (all of them on a tie);
    none when fewer than two rows have a finite value (nothing to compare)."""
    if metric in TRUTH_METRICS:  # the same for every method: nothing to compare
        return set()
    vals = [(i, r.get(metric)) for i, r in enumerate(rows)]
    vals = [(i, float(v)) for i, v in vals if isinstance(v, int | float) and math.isfinite(v)]
    if len(vals) < 2:
        return set()
    pick = min if lower_is_better(metric) else max
    top = pick(v for _, v in vals)
    return {i for i, v in vals if v == top}


def _ordered(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER
                                               else len(METHOD_ORDER), m))


# ----------------------------------------------------------------------------- tables


def _head(first: list[str], metrics: list[str]) -> str:
    cells = [f'<th class="k">{html.escape(c)}</th>' for c in first]
    for m in metrics:
        arrow, word = ("↓", "lower") if lower_is_better(m) else ("↑", "higher")
        cells.append(f'<th title="{word} is better">{html.escape(m)} {arrow}</th>')
    return "<thead><tr>" + "".join(cells) + "</tr></thead>"


def _row(keys: list[str], rec: dict, metrics: list[str], best: dict[str, bool],
         cls: str = "") -> str:
    cells = [f'<td class="k">{html.escape(str(k))}</td>' for k in keys]
    for m in metrics:
        mark = ' class="best"' if best.get(m) else ""
        cells.append(f"<td{mark}>{_num(rec.get(m))}</td>")
    attr = f' class="{cls}"' if cls else ""
    return f"<tr{attr}>" + "".join(cells) + "</tr>"


def summary_table(summary: list[dict], metrics: list[str], reference: str = "model") -> str:
    """Per assay (``all`` first), the mean of each metric per method, the best method
    highlighted; then per other method the share of tracks the model (``reference``)
    beats it on."""
    idx = {(s["assay"], s["method"], s["metric"]): s for s in summary}
    assays = list(dict.fromkeys(s["assay"] for s in summary))
    assays = (["all"] if "all" in assays else []) + [a for a in assays if a != "all"]
    body = []
    for assay in assays:
        methods = _ordered(s["method"] for s in summary if s["assay"] == assay)
        recs = []
        for meth in methods:
            cells = [idx.get((assay, meth, m)) for m in metrics]
            n = max((c["n"] for c in cells if c), default=0)
            recs.append({"method": meth, "n": n,
                         **{m: c["mean"] for m, c in zip(metrics, cells, strict=True) if c}})
        best = {m: best_methods(recs, m) for m in metrics}
        for i, r in enumerate(recs):
            body.append(_row([assay if i == 0 else "", r["method"], r["n"]], r, metrics,
                             {m: i in best[m] for m in metrics}, "group" if i == 0 else ""))
        for meth in methods:
            if meth == reference:
                continue
            cells = {m: idx.get((assay, meth, m)) for m in metrics}
            first = next((c for c in cells.values() if c), None)
            pct = {m: (f"{100 * c['model_beats']:.0f}%" if c and c["model_beats"] is not None
                       and math.isfinite(c["model_beats"]) else "–") for m, c in cells.items()}
            body.append(_row(["", f"{reference} beats {meth}",
                              first["n_paired"] if first else ""], pct, metrics, {}, "beats"))
    return ('<div class="scroll"><table id="summary">' + _head(["assay", "method", "n"], metrics)
            + "<tbody>" + "".join(body) + "</tbody></table></div>")


def track_table(rows: list[dict], metrics: list[str]) -> str:
    """One row per track and method, the best method of each track highlighted."""
    by_track: dict[str, list[dict]] = {}
    for r in rows:
        by_track.setdefault(r["track_id"], []).append(r)
    has_ind = any(r.get("individual") for r in rows)
    first = ["cell type"] + (["individual"] if has_ind else []) + ["assay", "method"]
    body = []
    for recs in by_track.values():
        recs = sorted(recs, key=lambda r: _ordered([x["method"] for x in recs]).index(r["method"]))
        best = {m: best_methods(recs, m) for m in metrics}
        for i, r in enumerate(recs):
            keys = [r["cell_type"] if i == 0 else ""]
            if has_ind:
                keys.append(r.get("individual", "") if i == 0 else "")
            keys += [r["assay"] if i == 0 else "", r["method"]]
            body.append(_row(keys, r, metrics, {m: i in best[m] for m in metrics},
                             "group" if i == 0 else ""))
    return ('<div class="scroll"><table id="tracks">' + _head(first, metrics) + "<tbody>"
            + "".join(body) + "</tbody></table></div>")


# ----------------------------------------------------------------------------- provenance


def _read_json(path: str) -> tuple[dict | None, str]:
    """(the JSON at ``path``, "") or (None, why not): provenance never stops a report."""
    try:
        if not storage.exists(path):
            return None, f"{path} does not exist"
        return json.loads(storage.read_text(path)), ""
    except Exception as e:  # any unreadable source: say so on the page
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"


def _kv(d: dict | None, keys=None) -> str:
    if not d:
        return ""
    items = d.items() if keys is None else ((k, d[k]) for k in keys if k in d)
    return ", ".join(f"{k}={v}" for k, v in items)


def provenance(doc: dict, imputed: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The sections of provenance: ``[(title, [(field, value or a note), ...]), ...]``.

    Parameters
    ----------
    doc : what ``metrics.json`` holds (truth, imputed, store, space, genome, ...).
    imputed : the folder of imputed bigWigs; its parent is the run folder when it holds
        a ``run.json``.
    """
    genome = doc.get("genome") or []
    out = [("Evaluation", [
        ("written", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")),
        ("truth manifest", doc.get("truth", "")),
        ("imputed bigWigs", imputed),
        ("baselines from store", doc.get("store") or "none (no --store: model only)"),
        ("metric space", doc.get("space", "")),
        ("genome", f"{len(genome)} chromosomes, {sum(int(c['n_bins']) for c in genome):,} "
                   f"bins: {', '.join(c['name'] for c in genome[:8])}"
                   f"{', ...' if len(genome) > 8 else ''}" if genome else ""),
        ("peaks", doc.get("peaks", "")),
        ("annotation", ", ".join(f"{k}: {v}" for k, v in (doc.get("annotation") or {}).items())
         or "none"),
    ])]
    run_dir = storage.parent(imputed.rstrip("/"))
    run, why = _read_json(storage.join(run_dir, runfolder.RUN_JSON))
    if run is None:
        out.append(("Imputation run", [("note", f"the imputed folder is not in an imputation "
                                                f"run folder ({why}): run, model and store "
                                                "are unknown")]))
        store_path = doc.get("store")
    else:
        export, _ = _read_json(storage.join(imputed, runfolder.EXPORT_JSON))
        recs = run.get("targets") or []
        out.append(("Imputation run", [
            ("run folder", run_dir),
            ("created", str(run.get("created", ""))),
            ("completed", str(run.get("completed", "not recorded"))),
            ("device", str(run.get("device", ""))),
            ("compute dtype", f"{run.get('dtype', '')} (output {run.get('output_dtype', '')})"),
            ("targets", f"{len(recs)}: " + ", ".join(r.get("track_id", "") for r in recs[:12])
             + (", ..." if len(recs) > 12 else "")),
            ("supports", f"{len(run.get('supports') or [])} observed tracks"),
            ("chromosomes", ", ".join(run.get("chroms") or [])),
            ("bigWig values", (export or {}).get("space", "unknown")),
            ("written by", f"edice-dist {run.get('tool_version', '?')}"),
        ]))
        out.append(_model_section(run))
        store_path = run.get("store") or doc.get("store")
    out.append(_store_section(store_path))
    out.append(("Software", [("edice-dist", __version__),
                             ("python", platform.python_version()),
                             ("platform", platform.platform())]
                + [(p, _version(p)) for p in SOFTWARE]))
    return out


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _model_section(run: dict) -> tuple[str, list[tuple[str, str]]]:
    model_dir = run.get("model") or ""
    meta, why = _read_json(storage.join(model_dir, "model.json")) if model_dir else (None, "")
    fields = [("model folder", model_dir), ("sha256", str(run.get("model_sha256", "")))]
    if meta is None:
        return "Model", fields + [("note", why or "the run names no model")]
    fields += [
        ("kind", str(meta.get("kind", ""))),
        ("trained", str(meta.get("trained", ""))),
        ("architecture", _kv(meta.get("model_config"))),
        ("training config", _kv(meta.get("train_config"))),
        ("epochs", f"best {meta.get('epoch')} of {meta.get('epochs_run')} run"
                   f"{' (stopped early)' if meta.get('stopped_early') else ''}"),
        ("validation", f"MSE {_num(meta.get('best_val_mse'))}, Pearson "
                       f"{_num(meta.get('best_val_pearson'))} (AVG MSE "
                       f"{_num(meta.get('val_avg_mse'))})"),
        ("vocabulary", f"{len(meta.get('cell_keys') or [])} cells x "
                       f"{len(meta.get('assays') or [])} assays"),
        ("written by", f"edice-dist {meta.get('tool_version', '?')}"),
    ]
    if meta.get("parent_model"):
        fields.append(("fine-tuned from", str(meta["parent_model"])))
    return "Model", fields


def _store_section(path: str | None) -> tuple[str, list[tuple[str, str]]]:
    if not path:
        return "Track store", [("note", "unknown: no --store and no run folder")]
    # Root attributes of a Zarr v3 group live in its zarr.json: read as JSON, no zarr needed.
    meta, why = _read_json(storage.join(path, "zarr.json"))
    attrs = (meta or {}).get("attributes") or {}
    if not attrs:
        return "Track store", [("store", path), ("note", why or "no attributes")]
    tracks = attrs.get("tracks") or []
    splits = {}
    for t in tracks:
        splits[t.get("split", "train")] = splits.get(t.get("split", "train"), 0) + 1
    return "Track store", [
        ("store", path),
        ("created", str(attrs.get("created", ""))),
        ("tracks", f"{len(tracks)} (" + ", ".join(f"{n} {s}" for s, n in splits.items()) + ")"),
        ("cells x assays", f"{len(attrs.get('cell_keys') or [])} x "
                           f"{len(attrs.get('assays') or [])}: "
                           + ", ".join(attrs.get("assays") or [])),
        ("bins", f"{attrs.get('bin_size')} bp, chunks of {attrs.get('chunk_bins')}, "
                 f"{attrs.get('dtype')}, values {attrs.get('transform')}(-log10 p)"),
        ("written by", f"{attrs.get('tool', '')} {attrs.get('tool_version', '')}"),
    ]


def _provenance_html(sections) -> str:
    parts = []
    for title, fields in sections:
        items = "".join(
            f"<dt>{html.escape(k)}</dt><dd{' class=note' if k == 'note' else ''}>"
            f"{html.escape(v)}</dd>" for k, v in fields)
        parts.append(f"<h3>{html.escape(title)}</h3><dl>{items}</dl>")
    return "".join(parts)


# ----------------------------------------------------------------------------- page


def _figure(name: str, path: str, caption: str | None = None) -> str:
    data = base64.b64encode(storage.read_bytes(path)).decode("ascii")
    caption = caption or {"metrics_by_assay.png": "Mean of each metric per assay and method."}.get(name)
    if caption is None and name.startswith("scatter_model_vs_"):
        caption = (f"Per track: the model (y) against {name[17:-4]} (x); above the diagonal "
                   "the model scores higher (better, except for mse*).")
    if caption is None and name.startswith("browser_"):
        caption = (f"{name[8:-4]}: truth, imputation and baselines around the truth's "
                   "highest bin; peak bins shaded.")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(name)}: {html.escape(caption or '')}</figcaption>"
            "</figure>")


def render(rows: list[dict], summary: list[dict], metrics: list[str], plots: dict[str, str],
           doc: dict, imputed: str, title: str = "eDICE evaluation", reference: str = "model",
           sections: list | None = None, captions: dict[str, str] | None = None) -> str:
    """The HTML text of the page.

    Parameters
    ----------
    rows, summary, metrics : as ``edice_dist.evaluate`` makes them.
    plots : PNG file name -> path (embedded in this order).
    doc : the ``metrics.json`` document (its settings; see :func:`provenance`).
    imputed : the folder of imputed bigWigs.
    title, reference : the page's heading; the method the others are compared with.
    sections : the provenance sections, when not those of an imputation run
        (:func:`provenance`).
    captions : plot file name -> caption, for plots the page does not know.
    """
    n_tracks = len({r["track_id"] for r in rows})
    methods = ", ".join(_ordered(r["method"] for r in rows))
    figs = "".join(_figure(n, p, (captions or {}).get(n)) for n, p in plots.items()
                   if n.endswith(".png"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}: {n_tracks} tracks</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="lead">{n_tracks} truth tracks; methods: {html.escape(methods)}; metrics on
{html.escape(str(doc.get("space", "")))} values over the whole genome. Written by edice-dist
{html.escape(__version__)}.</p>
<h2>Mean over tracks</h2>
<p class="legend">Per assay and method; <span class="best">highlighted</span>: the best method
of the assay for that metric (↓ lower is better, ↑ higher is better); n: tracks.
"{html.escape(reference)} beats X": share of tracks on which {html.escape(reference)} is
better than X.</p>
{summary_table(summary, metrics, reference)}
<h2>Plots</h2>
{figs or '<p class="note">No plots (evaluated with --no-plots).</p>'}
<h2>Per track</h2>
<p class="legend"><span class="best">highlighted</span>: the best method of the track for
that metric.</p>
{track_table(rows, metrics)}
<h2>Provenance</h2>
{_provenance_html(sections if sections is not None else provenance(doc, imputed))}
</body></html>
"""


def write_report(out: str, rows: list[dict], summary: list[dict], metrics: list[str],
                 plots: dict[str, str], doc: dict, imputed: str, **kw) -> str:
    """Write ``out/report.html`` (atomically) and return its path; see :func:`render`
    (``kw``: its ``title``, ``reference``, ``sections`` and ``captions``)."""
    path = storage.join(out, REPORT)
    storage.write_text_atomic(path, render(rows, summary, metrics, plots, doc, imputed, **kw))
    return path
