"""Accuracy benchmark: model variants against AVG (and the authors' eDICE) on several
simulated consortia, at equal bin-samples.

    python benchmarks/bench_accuracy.py [--out DIR] [--consortia A11 A12 B13]
        [--variants default paper] [--reference PATH --reference-python PY] [--json OUT]

Each consortium (a shape x a seed) is simulated and ingested once; every variant is then
trained with the same settings and the same number of bin-samples (the issue's "small
settings", as a new user would run them: ``embed_dim=64 decoder_hidden=512 n_targets=30
epochs=6 bins_per_epoch=60000 batch_size=256 seed=1``, everything else default), imputes the
held-out tracks, and is scored by ``edice evaluate`` against the held-out truth in arcsinh
space, beside the AVG baseline of the same store. The authors' TensorFlow eDICE, when a
checkout is given, trains on the same training tracks for the same bin-samples (3 epochs
of all bins = 6 x 60,000 on a 120,000-bin consortium) and its predictions are written as
bigWigs and scored by the same command.

Shapes (their assays include the broad repressive marks H3K9me3 and H3K27me3):

- ``A``: 20 cell types x 10 assays, 3 Mbp (120,000 bins), 28 held-out tracks;
- ``B``: 30 cell types x 8 assays, 5 Mbp (200,000 bins), 30 held-out tracks.

Variants are training configs (``VARIANTS``): ``default`` is what ``edice train`` does
unless told otherwise (local context, then the refit on every observed track for the
selected number of epochs: its final model sees at most the others' bin-samples, and the
selection run before it costs as much again); ``selection`` is the default without the
refit (the model chosen on the held-out validation tracks); ``paper`` is the paper's model
(no context channels, no same-assay skip, plain MSE), without the refit; ``before`` is the
default before the same-assay skip and the peak term (refit included); ``noskip``,
``mean``, ``attention``, ``skip_peak*`` and ``default_peak0.1`` are the steps measured in
BENCHMARKS.md, "Peaks and broad domains", without the weight average; ``noaverage`` is the
default then without it, ``average`` with it (``average_decay=0.999``) and
``selection_average`` its selection run alone; ``mask0.1`` that default with
``mask_cells=0.1``; ``noblend`` is the default without the AVG blend (``avg_blend``);
``domain500`` adds a context window of half-width 500 bins (25 kb, a broad domain) to
the default's (4, 20, 100); ``peakwin`` is the default with ``peak_by=window``,
``peakboth`` with ``peak_by=both``, ``peakeither`` with ``peak_by=either`` (the default
from when it was measured until ``neighbours``), ``peakbin`` with ``peak_by=bin`` (the
default before ``either``), ``peaknear`` with ``peak_by=neighbours`` (the default since it
was measured), ``peakwin500`` with ``peak_by=window`` and the
half-width 500 window, ``peakto`` with ``peak_target=window``, ``peaklift`` with
``peak_target=lift``, ``peakassay`` with ``peak_mean=assays``, ``peakwinassay`` with
both and ``nopeak`` without the peak term.
Every variant measured before the blend existed pins ``avg_blend=false``, and every one
with a peak term pins ``peak_by``, so that the commands in BENCHMARKS.md keep meaning what
they measured.
Prints per consortium and overall: the mean over held-out tracks of MSE, GWcorr, MSE on
peaks (``mse_fg``), MSE on the truth's top 1 % (``mse1obs``), AUPRC, and the MSE of the
broad marks, for every method; and on how many tracks each variant beats AVG.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {
    "A": {"n_cell_types": "20", "n_tissues": "4", "n_test": "28", "other_fraction": "0.55",
          "assays": "H3K4me3,H3K27ac,H3K4me1,H3K36me3,H3K27me3,H3K9me3,DNase,H3K9ac,"
                    "H3K4me2,H3K79me2",
          "chrom_sizes": "chr1:1400000,chr2:1000000,chr3:600000"},
    "B": {"n_cell_types": "30", "n_tissues": "6", "n_test": "30",
          "chrom_sizes": "chr1:2000000,chr2:1500000,chr3:1000000,chr4:500000"},
}
SMALL = {"embed_dim": "64", "decoder_hidden": "512", "n_targets": "30", "epochs": "6",
         "bins_per_epoch": "60000", "batch_size": "256", "seed": "1"}
VARIANTS = {
    "default": {},
    "before": {"same_assay": "none", "peak_weight": "0", "average_decay": "0",
               "avg_blend": "false"},
    "default_peak0.1": {"peak_weight": "0.1", "average_decay": "0", "avg_blend": "false",
                        "peak_by": "bin"},
    "selection": {"refit": "false"},
    "paper": {"context": "none", "same_assay": "none", "peak_weight": "0", "refit": "false",
              "average_decay": "0", "avg_blend": "false"},
    "noskip": {"same_assay": "none", "peak_weight": "0", "refit": "false", "average_decay": "0",
               "avg_blend": "false"},
    "mean": {"same_assay": "mean", "peak_weight": "0", "refit": "false", "average_decay": "0",
             "avg_blend": "false"},
    "attention": {"same_assay": "attention", "peak_weight": "0", "refit": "false",
                  "average_decay": "0", "avg_blend": "false"},
    "noskip_peak1": {"same_assay": "none", "peak_weight": "1", "refit": "false",
                     "average_decay": "0", "avg_blend": "false", "peak_by": "bin"},
    **{f"skip_peak{w}": {"same_assay": "attention", "peak_weight": w, "refit": "false",
                         "average_decay": "0", "avg_blend": "false", "peak_by": "bin"}
       for w in ("0.1", "0.2", "0.3", "0.5", "1")},
    "noaverage": {"average_decay": "0", "avg_blend": "false", "peak_by": "bin"},
    "average": {"average_decay": "0.999", "avg_blend": "false", "peak_by": "bin"},
    "selection_average": {"average_decay": "0.999", "refit": "false",
                          "avg_blend": "false", "peak_by": "bin"},
    "mask0.1": {"mask_cells": "0.1", "avg_blend": "false", "peak_by": "bin"},
    "noblend": {"avg_blend": "false", "peak_by": "bin"},
    "domain500": {"context": "4,20,100,500", "peak_by": "bin"},
    "peakwin": {"peak_by": "window"},
    "peakboth": {"peak_by": "both"},
    "peakeither": {"peak_by": "either"},
    "peakbin": {"peak_by": "bin"},
    "peaknear": {"peak_by": "neighbours"},
    "peakwin500": {"peak_by": "window", "context": "4,20,100,500"},
    "peakto": {"peak_by": "bin", "peak_target": "window"},
    "peaklift": {"peak_by": "bin", "peak_target": "lift"},
    "peakassay": {"peak_by": "bin", "peak_mean": "assays"},
    "peakwinassay": {"peak_by": "window", "peak_mean": "assays"},
    "nopeak": {"peak_weight": "0", "peak_by": "bin"},
}
BROAD = ("H3K9me3", "H3K27me3")
METRICS = ("mse", "gwcorr", "mse_fg", "mse1obs", "catch1obs", "auprc")


def _run(name: str, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)
    return out


def consortium(root: str, shape: str, seed: int) -> dict:
    """Simulate and ingest one consortium (skipped when already there)."""
    from edice_dist.ingest import ingest
    from edice_dist.simulate import SimConfig, simulate

    d = os.path.join(root, f"{shape}{seed}")
    sim = os.path.join(d, "consortium")
    cfg = SimConfig.from_overrides({**SHAPES[shape], "seed": str(seed), "zoom_levels": "0"})
    _run("simulate", simulate, sim, cfg)
    store = os.path.join(d, "store")
    _run("ingest", ingest, os.path.join(sim, "manifest.tsv"), os.path.join(sim, "chrom.sizes"),
         store)
    return {"dir": d, "sim": sim, "store": store,
            "truth": os.path.join(sim, "truth", "targets.tsv")}


def run_variant(c: dict, variant: str, extra: dict | None = None) -> dict:
    """Train, impute and evaluate one variant; returns {track: {method: metrics}}."""
    from edice_dist.evaluate import evaluate
    from edice_dist.impute import impute
    from edice_dist.train import train
    from edice_dist.trainconfig import load_config

    d = os.path.join(c["dir"], variant)
    cfg = load_config(None, {**SMALL, **VARIANTS[variant], **(extra or {})})
    t = time.perf_counter()
    res = _run(f"train {variant}", train, c["store"], os.path.join(d, "model"), cfg)
    train_s = time.perf_counter() - t
    _run(f"impute {variant}", impute, c["store"], os.path.join(d, "model"),
         os.path.join(d, "run"), targets=c["truth"], hub=False)
    _run(f"evaluate {variant}", evaluate, c["truth"], os.path.join(d, "run", "bigwig"),
         store=c["store"], out=os.path.join(d, "evaluation"), plots=False)
    return {"tracks": read_metrics(os.path.join(d, "evaluation", "metrics.tsv")),
            "best_epoch": res.get("best_epoch"), "train_s": train_s}


def run_reference(c: dict, reference: str, python: str) -> dict:
    """The authors' eDICE on the same training tracks, scored like the variants."""
    import pyBigWig
    from reference import reference_predictions  # benchmarks/reference.py

    from edice_dist.evaluate import evaluate
    from edice_dist.runfolder import bigwig_name
    from edice_dist.store import open_store
    from edice_dist.tracks import track_id
    from edice_dist.truth import read_truth

    st = open_store(c["store"])
    targets = [(t.cell_key, t.assay) for t in read_truth(c["truth"])]
    n_bins = st.genome.total_bins
    epochs, per_epoch = int(SMALL["epochs"]), int(SMALL["bins_per_epoch"])
    settings = {k: int(SMALL[k]) for k in ("embed_dim", "decoder_hidden", "n_targets",
                                           "batch_size", "seed")}
    if (epochs * per_epoch) % n_bins:  # equal bin-samples: epochs of bins_per_epoch
        settings.update(epochs=epochs, bins_per_epoch=per_epoch)
    else:  # the same bin-samples as whole passes over the genome, as the authors train
        settings.update(epochs=epochs * per_epoch // n_bins, bins_per_epoch=None)
    d = os.path.join(c["dir"], "reference")
    done = os.path.join(d, "evaluation", "metrics.tsv")
    if os.path.exists(done):  # scored by an earlier run of this script
        return {"tracks": read_metrics(done)}
    saved = os.path.join(d, "work", "reference_predictions.npz")
    if os.path.exists(saved) and os.path.exists(os.path.join(d, "work", "reference_timings.json")):
        with np.load(saved) as z:  # trained and predicted by an earlier, interrupted run
            pred = np.array(z["predictions"], dtype=np.float32)
    else:
        pred = _run("reference", reference_predictions, reference, python, c["store"], targets,
                    settings, os.path.join(d, "work"))
    bw_dir = os.path.join(d, "bigwig")
    os.makedirs(bw_dir, exist_ok=True)
    for (cell, assay), p in zip(targets, pred, strict=True):
        bw = pyBigWig.open(os.path.join(bw_dir, bigwig_name(track_id(cell, assay))), "w")
        bw.addHeader([(ch, st.genome.size[ch]) for ch in st.genome.chroms])
        off = 0
        for ch in st.genome.chroms:
            nb = st.genome.n_bins(ch)
            vals = np.sinh(np.maximum(p[off:off + nb], 0)).astype(np.float64)
            bw.addEntries(ch, 0, values=vals.tolist(), span=25, step=25)
            off += nb
        bw.close()
    evaluate(c["truth"], bw_dir, out=os.path.join(d, "evaluation"), plots=False)
    return {"tracks": read_metrics(os.path.join(d, "evaluation", "metrics.tsv"))}


def read_metrics(path: str) -> dict:
    """{(cell, assay): {method: {metric: value}}} from a metrics.tsv."""
    lines = open(path).read().splitlines()
    head = lines[0].split("\t")
    out: dict = {}
    for line in lines[1:]:
        row = dict(zip(head, line.split("\t"), strict=True))
        key = (row["cell_type"], row["assay"])
        out.setdefault(key, {})[row["method"]] = {m: float(row[m]) for m in METRICS}
    return out


def summarise(tracks: dict, method: str) -> dict:
    rows = [(k, v[method]) for k, v in tracks.items() if method in v]
    out = {m: float(np.nanmean([r[m] for _, r in rows])) for m in METRICS}
    for mark in BROAD:
        group = [r["mse"] for k, r in rows if k[1] == mark]
        out[f"mse_{mark}"] = float(np.mean(group)) if group else float("nan")
    return out


def per_assay(tracks: dict, methods: list[str]) -> str:
    """Per assay and method: the mean MSE, GWcorr, peak MSE, Catch1obs and AUPRC."""
    cols = ("mse", "gwcorr", "mse_fg", "catch1obs", "auprc")
    lines = ["| assay | method | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for assay in sorted({k[1] for k in tracks}):
        keys = [k for k in tracks if k[1] == assay]
        for m in methods:
            rows = [tracks[k][m] for k in keys if m in tracks[k]]
            if rows:
                vals = " | ".join(f"{np.nanmean([r[c] for r in rows]):.3f}" for c in cols)
                lines.append(f"| {assay} | {m} | {len(rows)} | {vals} |")
    return "\n".join(lines)


def wins(tracks: dict, method: str, base: str = "AVG") -> dict:
    """Tracks on which ``method`` beats ``base``, per metric (lower MSEs, higher others)."""
    from edice_dist.metrics import lower_is_better

    out = {}
    for m in METRICS:
        better = [(v[method][m] < v[base][m]) if lower_is_better(m) else (v[method][m] > v[base][m])
                  for v in tracks.values() if method in v and base in v]
        out[m] = f"{sum(better)}/{len(better)}"
    return out


def table(rows: dict[str, dict]) -> str:
    cols = [*METRICS, *(f"mse_{m}" for m in BROAD)]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out/accuracy")
    ap.add_argument("--consortia", nargs="+", default=["A11", "A12", "B13"],
                    help="shape letter then simulator seed, e.g. A11 (shapes: A, B)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    ap.add_argument("--reference", help="a checkout of the authors' eDICE (alex-hh/eDICE)")
    ap.add_argument("--reference-python", help="the python of tensorflow-cpu==2.15.1")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="training settings for every variant (e.g. cpus_per_worker=1)")
    a = ap.parse_args(argv)
    from edice_dist import raycluster

    raycluster.init()
    print(f"# bench_accuracy: {_dt.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; settings {SMALL}")
    results: dict = {}
    for name in a.consortia:
        shape, seed = name[0], int(name[1:])
        if shape not in SHAPES:
            ap.error(f"consortium {name}: shape {shape!r} is not one of {sorted(SHAPES)}")
        print(f"== consortium {name}", flush=True)
        c = consortium(a.out, shape, seed)
        per = {}
        for v in a.variants:
            per[v] = run_variant(c, v, dict(kv.split("=", 1) for kv in a.set))
        if a.reference:
            per["reference"] = run_reference(c, a.reference,
                                             a.reference_python or sys.executable)
        results[name] = per
        first = per[a.variants[0]]["tracks"]
        rows = {v: summarise(per[v]["tracks"], "model") for v in per}
        rows["AVG"] = summarise(first, "AVG")
        print(table(rows))
        merged = {k: {"AVG": v["AVG"], **{n: per[n]["tracks"][k]["model"] for n in per
                                          if k in per[n]["tracks"]}}
                  for k, v in first.items()}
        print(per_assay(merged, [*per, "AVG"]))
        for v in a.variants:
            print(f"  {v} beats AVG on {wins(per[v]['tracks'], 'model')} tracks; best "
                  f"epoch {per[v]['best_epoch']}, training {per[v]['train_s']:.0f} s")
    print("== mean over consortia")
    overall = {}
    for v in [*a.variants, *(["reference"] if a.reference else [])]:
        s = [summarise(results[n][v]["tracks"], "model") for n in results]
        overall[v] = {k: float(np.mean([x[k] for x in s])) for k in s[0]}
    s = [summarise(results[n][a.variants[0]]["tracks"], "AVG") for n in results]
    overall["AVG"] = {k: float(np.mean([x[k] for x in s])) for k in s[0]}
    print(table(overall))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"overall": overall, "per_consortium": {
                n: {v: {"summary": summarise(r[v]["tracks"], "model"),
                        "avg": summarise(r[v]["tracks"], "AVG") if v != "reference" else None}
                    for v in r} for n, r in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
