"""A full consortium on the track axis, end to end: Roadmap's shape at 250 to 1,000 tracks.

    python benchmarks/bench_consortium.py --out DIR [--tracks 250 500 1000] [--bins 500000]
                                          [--json OUT]

Roadmap measured 1,014 of 127 cell types x 24 assays (a third of the 3,048 pairs) and
left ~2,000 pairs to impute. For each ``--tracks T`` this simulates that shape over one
genome slice (``--bins`` 25 bp bins on ``--chroms`` chromosomes, the same slice for every
T): ``--assays`` assays (24 by default, Roadmap's marks), ``round(T * 3 / assays)`` cell
types in 10 tissue groups, every pair simulated, ``T`` of them observed and every other
one held out as truth. So the imputation targets (every missing pair) are exactly the
held-out tracks, ~2 T of them, and the evaluation covers every target. Then, each stage
as a fresh ``edice`` process (Ray's start included), measured by :mod:`_measure`:

simulate -> ingest -> train -> impute (no export) -> export (bigWigs and the track hub)
-> evaluate (the model and AVG against every held-out track; plots and report included).

The model is reduced so that the 1,000-track point fits in an hour on a 2-core box
(``TRAIN``: d = 32, feed-forward 32, decoder 2 x 128, 1 epoch of 8,192 bins, then the
default refit): this measures how the pipeline holds up on the track axis, not the
model's arithmetic (BENCHMARKS.md, Imputation, has the paper-size rates; the projection
there uses them). Afterwards it checks the run as a user would: one bigWig per missing
pair, each listed once in the hub, and an evaluation row for every held-out track.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import run_stage  # noqa: E402  (benchmarks/_measure.py)

ROADMAP_ASSAYS = (
    # the 12 marks the simulator models, then Roadmap's other acetylation and methylation
    # marks (the simulator gives those a seeded random response)
    "H3K4me3,H3K4me1,H3K36me3,H3K27me3,H3K9me3,H3K27ac,H3K9ac,DNase,H3K4me2,H2A.Z,"
    "H3K79me2,H4K20me1,H2AK5ac,H2BK120ac,H2BK12ac,H2BK15ac,H2BK20ac,H2BK5ac,H3K14ac,"
    "H3K18ac,H3K23ac,H3K4ac,H3K56ac,H3K79me1,H3K9me1,H4K5ac,H4K8ac,H4K91ac"
).split(",")
TRAIN = {"embed_dim": 32, "n_heads": 2, "ffn_dim": 32, "decoder_hidden": 128, "lr": 1e-3,
         "epochs": 1, "bins_per_epoch": 8192, "batch_size": 256, "val_bins": 8192,
         "seed": 0}


def design(tracks: int, n_assays: int) -> dict:
    """Roadmap's shape for ``tracks`` observed tracks: a third of the pairs observed."""
    cells = max(3, round(tracks * 3 / n_assays))
    return {"cell_types": cells, "assays": n_assays, "pairs": cells * n_assays,
            "observed": tracks, "targets": cells * n_assays - tracks}


def run_point(out: str, tracks: int, bins: int, n_chroms: int, n_assays: int,
              workers: int) -> dict:
    """Every stage at one consortium size; returns its rows and the checks."""
    d = design(tracks, n_assays)
    work = os.path.join(out, f"tracks-{tracks}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log = os.path.join(work, "log.txt")
    cons, store = os.path.join(work, "consortium"), os.path.join(work, "store")
    model, run = os.path.join(work, "model"), os.path.join(work, "run")
    evald = os.path.join(work, "evaluation")
    assays = ROADMAP_ASSAYS[:n_assays]
    sim = {"genome_bp": bins * 25, "n_chroms": n_chroms, "n_cell_types": d["cell_types"],
           "n_tissues": min(10, d["cell_types"]), "assays": ",".join(assays),
           "core_assays": ",".join(assays[:5]), "core_fraction": 1.0, "other_fraction": 1.0,
           "n_test": d["targets"], "zoom_levels": 0, "workers": workers}
    train = dict(TRAIN, n_targets=min(120, tracks // 2))
    manifest = os.path.join(cons, "manifest.tsv")
    rows = [
        run_stage("simulate", ["simulate", cons, "--seed", "1",
                               *[f"--{k}={v}" for k, v in sim.items()]], cons, log),
        run_stage("ingest", ["ingest", manifest, "--chrom-sizes",
                             os.path.join(cons, "chrom.sizes"), "--out", store], store, log),
        run_stage("train", ["train", "--store", store, "--out", model,
                            *[f"--{k}={v}" for k, v in train.items()]], model, log),
        run_stage("impute", ["impute", "--store", store, "--model", model, "--out", run,
                             "--no-export"], os.path.join(run, "imputed.zarr"), log),
        run_stage("export", ["export", run], os.path.join(run, "bigwig"), log),
        run_stage("evaluate", ["evaluate", "--truth", os.path.join(cons, "truth", "targets.tsv"),
                               "--imputed", os.path.join(run, "bigwig"), "--store", store,
                               "--out", evald], evald, log),
    ]
    return {"tracks": tracks, "bins": bins, **d, "train": train, "stages": rows,
            "checks": check_run(cons, run, evald)}


def check_run(cons: str, run: str, evald: str) -> dict:
    """What a user would check: one bigWig per missing pair, each once in the hub, an
    evaluation row per held-out track (read from the files, not from the stages' logs)."""
    with open(os.path.join(cons, "truth", "targets.tsv")) as f:
        truth = {f"{r['cell_type']}-{r['assay']}" for r in csv.DictReader(f, delimiter="\t")}
    bw = os.path.join(run, "bigwig")
    written = {n[:-len(".bigWig")] for n in os.listdir(bw) if n.endswith(".bigWig")}
    with open(os.path.join(bw, "trackDb.txt")) as f:
        urls = [line.split()[1] for line in map(str.strip, f) if line.startswith("bigDataUrl ")]
    hub = [u[:-len(".bigWig")] for u in urls]
    with open(os.path.join(evald, "metrics.tsv")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    evaluated = {f"{r['cell_type']}-{r['assay']}" for r in rows if r["method"] == "model"}
    trackdb = os.path.getsize(os.path.join(bw, "trackDb.txt"))
    return {"truth": len(truth), "bigwigs": len(written), "hub_tracks": len(hub),
            "hub_unique": len(set(hub)), "evaluated": len(evaluated),
            "trackdb_bytes": trackdb,
            "ok": written == truth and sorted(hub) == sorted(truth) and evaluated == truth}


# ------------------------------------------------------------------ tables
COLS = [("wall s", "wall_s", "{:,.0f}"), ("CPU s", "cpu_s", "{:,.0f}"),
        ("peak PSS MiB (tree)", "peak_pss_mib", "{:,.0f}"),
        ("largest process MiB", "peak_proc_pss_mib", "{:,.0f}"),
        ("read MB", "read_mb", "{:,.0f}"), ("written MB", "written_mb", "{:,.0f}"),
        ("open fds (tree)", "fds", "{:,}"), ("most fds, one process", "fds_proc", "{:,}"),
        ("most data files open, one process", "data_fds_proc", "{:,}"),
        ("files left", "files", "{:,}")]


def table(results: list[dict]) -> str:
    head = "| tracks | targets | stage | " + " | ".join(c[0] for c in COLS) + " |"
    lines = [head, "|" + "---:|" * 2 + "---|" + "---:|" * len(COLS)]
    for r in results:
        for s in r["stages"]:
            vals = " | ".join(fmt.format(s[k]) for _, k, fmt in COLS)
            lines.append(f"| {r['observed']:,} | {r['targets']:,} | {s['stage']} | {vals} |")
    return "\n".join(lines)


def scaling(results: list[dict]) -> str:
    """Each size over the smallest: the growth of every measure, stage by stage."""
    base = results[0]
    keys = [("wall", "wall_s"), ("CPU", "cpu_s"), ("peak PSS", "peak_pss_mib"),
            ("read", "read_mb"), ("written", "written_mb"), ("fds (tree)", "fds")]
    lines = ["| stage | tracks | " + " | ".join(k[0] for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for r in results[1:]:
        for s0, s in zip(base["stages"], r["stages"], strict=True):
            ratio = " | ".join(f"{s[k] / s0[k]:.2f}x" if s0[k] else "-" for _, k in keys)
            lines.append(f"| {s['stage']} | {r['observed']} / {base['observed']} "
                         f"({r['observed'] / base['observed']:.1f}x) | {ratio} |")
    return "\n".join(lines)


UNITS = {  # what each stage's work is proportional to, for rates per unit
    "simulate": ("pairs", "G pair-bins"), "ingest": ("observed", "G track-bins"),
    "train": (None, "training run"), "impute": ("targets", "G target-bins"),
    "export": ("targets", "G target-bins"), "evaluate": ("targets", "G target-bins"),
}


def rates(results: list[dict]) -> str:
    """CPU seconds per unit of work (tracks or targets x bins): flat when time grows
    linearly in tracks x bins."""
    head = "| stage | unit | " + " | ".join(f"{r['observed']:,} tracks" for r in results) + " |"
    lines = [head, "|---|---|" + "---:|" * len(results)]
    for i, stage in enumerate(s["stage"] for s in results[0]["stages"]):
        key, unit = UNITS[stage]
        cells = []
        for r in results:
            cpu = r["stages"][i]["cpu_s"]
            cells.append(f"{cpu:,.0f}" if key is None else f"{cpu / (r[key] * r['bins'] / 1e9):,.0f}")
        lines.append(f"| {stage} | CPU s per {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="work folder")
    ap.add_argument("--tracks", type=int, nargs="+", default=[250, 500, 1000],
                    help="observed tracks of each consortium (targets are ~2x)")
    ap.add_argument("--bins", type=int, default=500_000,
                    help="25 bp bins of the genome slice (12.5 Mbp by default: the 1,000-track "
                         "point takes about 35 minutes on a quiet 2-core box, 1,000,000 "
                         "bins about 65)")
    ap.add_argument("--chroms", type=int, default=2, help="chromosomes of the slice")
    ap.add_argument("--assays", type=int, default=24, choices=range(3, len(ROADMAP_ASSAYS) + 1),
                    metavar=f"3..{len(ROADMAP_ASSAYS)}", help="assays (Roadmap: 24)")
    ap.add_argument("--workers", type=int, default=2, help="simulation processes")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep each consortium's files")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results = []
    for t in a.tracks:
        r = run_point(a.out, t, a.bins, a.chroms, a.assays, a.workers)
        results.append(r)
        print(json.dumps({"tracks": t, "checks": r["checks"]}), flush=True)
        doc = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "argv": sys.argv[1:], "results": results}
        if a.json:  # after every point, so that a long sweep keeps what it measured
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)
        if not a.keep:
            shutil.rmtree(os.path.join(a.out, f"tracks-{t}"), ignore_errors=True)
    results.sort(key=lambda r: r["observed"])  # the scaling rows are over the smallest
    print(table(results))
    print()
    print(rates(results))
    if len(results) > 1:
        print()
        print(scaling(results))
    bad = [r["tracks"] for r in results if not r["checks"]["ok"]]
    if bad:
        raise SystemExit(f"the runs at {bad} tracks failed their checks (see the JSON)")


if __name__ == "__main__":
    main()
