"""Personalised imputation on a simulated 4-donor consortium: both workflows of
``edice personal``, the table of BENCHMARKS.md and its plot.

    python benchmarks/bench_personal.py --out /tmp/personal --seed 7 --json /tmp/p7.json
    python benchmarks/bench_personal.py --plot /tmp/p7.json /tmp/p8.json --png docs/x.png

Simulates the consortium (4 donors, 4 tissues, 6 assays, 1 Mbp), ingests it, runs
``edice personal leave-one-out`` (each donor's tracks hidden in 2 folds) and
``leave-tissue-out`` (two tissues of every donor that has them) with a small model, and
prints per workflow the mean over hidden tracks of every method (person-specific AUPRC
with its chance level, MSE, GWcorr, AUPRC) and on how many tracks the fine-tuned model
beats each other method. Every step resumes (``--models`` may grow between runs: only the
new models are trained). The folds, the tissues and the default models (the fine-tuned
model and its base, without alldonors) keep a seed at 24 models, ~8 min on a quiet 2-core
machine (leave-one-out proper, one track at a time, would train 1 + 2T models per donor
of T tracks: ~150 per workflow here); ``--plot`` draws the summaries of several runs' JSON
into one PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SIM = {"individuals": "4", "n_cell_types": "4", "n_tissues": "4",
       "individual_cell_fraction": "0.9", "private_rate": "40", "n_test": "4",
       "chrom_sizes": "chr1:600007,chr2:400009", "other_fraction": "0.7",
       "assays": "H3K4me3,H3K27ac,H3K4me1,H3K36me3,H3K27me3,DNase"}
TRAIN = {"embed_dim": "32", "ffn_dim": "32", "decoder_hidden": "128", "lr": "1e-3",
         "epochs": "8", "bins_per_epoch": "32000", "batch_size": "256", "patience": "2",
         "mask_cells": "0.5"}
PERSONAL = {"finetune_epochs": "4"}
SHOWN = ("auprc_person", "person_frac", "mse", "gwcorr", "auprc")


def command(workflow: str, out: str, extra: dict) -> str:
    flags = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in {**PERSONAL, **extra}.items())
    keys = " ".join(f"--{k}={v}" for k, v in TRAIN.items())
    return (f"edice personal {workflow} --store {out}/store --out {out}/{workflow} "
            f"--truth {out}/sim/truth/observed.tsv {flags} {keys}")


def table(summary: list[dict]) -> str:
    from edice_dist.personreport import METHODS, REFERENCE

    idx = {(s["method"], s["metric"]): s for s in summary if s["assay"] == "all"}
    lines = ["| method | tracks | " + " | ".join(SHOWN) + f" | {REFERENCE} beats it on |",
             "|---|---:|" + "---:|" * len(SHOWN) + "---|"]
    for m in METHODS:
        if (m, "mse") not in idx:
            continue
        vals = [idx[(m, k)]["mean"] if (m, k) in idx else float("nan") for k in SHOWN]
        beats = "" if m == REFERENCE else ", ".join(
            f"{k} {round(idx[(m, k)]['model_beats'] * idx[(m, k)]['n_paired'])}/"
            f"{idx[(m, k)]['n_paired']}" for k in ("auprc_person", "mse") if (m, k) in idx)
        cells = " | ".join(f"{v:.4f}" for v in vals)
        lines.append(f"| {m} | {idx[(m, 'mse')]['n']} | {cells} | {beats} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--models", default="finetuned,others",
                   help="the models of each fold (adding alldonors: 8 more models per "
                        "workflow, and only those are trained on a finished run)")
    p.add_argument("--tissues", default="blood_01,muscle_01",
                   help="the cell types leave-tissue-out hides (all: every one)")
    p.add_argument("--plot", nargs="+", metavar="JSON",
                   help="draw the summaries of these --json files into --png; run nothing")
    p.add_argument("--png", help="write the two workflows' summary plot here")
    p.add_argument("--json", help="write the summaries here")
    a = p.parse_args(argv)

    from edice_dist import plots, raycluster, stages
    from edice_dist.personreport import METHODS

    if a.plot:
        summaries = {}
        for path in a.plot:
            with open(path) as f:
                doc = json.load(f)
            for workflow, summary in doc["summaries"].items():
                summaries[f"{workflow}, seed {doc['seed']}"] = summary
        plots.method_summary(summaries, a.png, METHODS)
        return 0
    if not a.out:
        p.error("--out is required (or --plot)")
    raycluster.init()
    out = os.path.abspath(a.out)
    t0 = time.monotonic()
    stages.run_stage("simulate", {"out": f"{out}/sim"}, {**SIM, "seed": str(a.seed)})
    stages.run_stage("ingest", {"manifest": f"{out}/sim/manifest.tsv",
                                "chrom_sizes": f"{out}/sim/chrom.sizes", "out": f"{out}/store"})
    summaries, times = {}, {}
    for workflow, extra in (("leave-one-out", {"folds": str(a.folds), "models": a.models}),
                            ("leave-tissue-out", {"models": a.models} if a.tissues == "all"
                             else {"cell_types": a.tissues, "models": a.models})):
        t = time.monotonic()
        res = stages.run_stage(workflow, {"store": f"{out}/store", "out": f"{out}/{workflow}",
                                          "truth": f"{out}/sim/truth/observed.tsv"},
                               {**PERSONAL, **extra, **TRAIN})
        summaries[workflow] = res["summary"]
        times[workflow] = time.monotonic() - t
        print(f"\n### {workflow} (seed {a.seed}; {len(res['ran'])} units computed in "
              f"{times[workflow]:.0f} s)\n\n    {command(workflow, out, extra)}\n")
        print(table(res["summary"]), flush=True)
    if a.png:
        plots.method_summary({f"{w}, seed {a.seed}": s for w, s in summaries.items()}, a.png,
                             METHODS)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"seed": a.seed, "seconds": times, "summaries": summaries}, f, indent=1,
                      default=str)
    print(f"\nall done in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
