"""A whole genome end to end on one machine: simulate, ingest, train, impute (+ export).

    python benchmarks/bench_genome.py --out DIR [--fractions 1 0.5] [--json OUT]

The genome is the hg38 primary assembly grid (chr1-22, X, Y, M: 3,088,269,832 bp, 123.5 M
bins of 25 bp); ``--fractions 0.5`` scales every chromosome to half its size (the same 25
chromosomes), to show that memory is flat in genome length and time linear in it. The
consortium is small (13 observed tracks of 4 cell types x 4 assays, 3 held out and
imputed), the model tiny (d = 16, decoder 32 wide, 2 epochs of 50,000 bins): this measures
the pipeline's streaming over a genome, not the model's arithmetic (BENCHMARKS.md,
Imputation, has that).

Each stage runs as ``python -m edice_dist STAGE ...`` in a fresh process (Ray's start
included). Recorded per stage:

- wall seconds, and CPU seconds of every process of its tree (driver, Ray's daemons and
  workers; each process's last sampled user + system time, so a process shorter than the
  sampling period may be missed);
- peak memory: PSS (``/proc/PID/smaps_rollup``) summed over every process of the tree,
  sampled every second; PSS, not RSS, so that Ray's shared object store and shared
  libraries count once (STACK_NOTES);
- disk: bytes of what the stage leaves (the consortium, the store, the model, the run
  folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import run_stage  # noqa: E402  (benchmarks/_measure.py)

HG38 = {
    "chr1": 248956422, "chr2": 242193529, "chr3": 198295559, "chr4": 190214555,
    "chr5": 181538259, "chr6": 170805979, "chr7": 159345973, "chr8": 145138636,
    "chr9": 138394717, "chr10": 133797422, "chr11": 135086622, "chr12": 133275309,
    "chr13": 114364328, "chr14": 107043718, "chr15": 101991189, "chr16": 90338345,
    "chr17": 83257441, "chr18": 80373285, "chr19": 58617616, "chr20": 64444167,
    "chr21": 46709983, "chr22": 50818468, "chrX": 156040895, "chrY": 57227415,
    "chrM": 16569,
}
SIM = {"n_cell_types": 4, "n_tissues": 2, "assays": "H3K4me3,H3K27ac,H3K4me1,H3K36me3",
       "core_assays": "H3K4me3,H3K27ac,H3K4me1,H3K36me3", "core_fraction": 1.0, "n_test": 3,
       "zoom_levels": 0, "workers": 2}
TRAIN = {"embed_dim": 16, "n_heads": 2, "ffn_dim": 16, "decoder_hidden": 32, "epochs": 2,
         "bins_per_epoch": 50000, "batch_size": 256, "val_bins": 20000, "seed": 0}


# ------------------------------------------------------------------ one genome
def run_genome(out: str, fraction: float) -> dict:
    work = os.path.join(out, f"genome-{fraction:g}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    sizes = {c: max(1, round(s * fraction)) for c, s in HG38.items()}
    sizes_file = os.path.join(work, "chrom.sizes")
    with open(sizes_file, "w") as f:
        f.writelines(f"{c}\t{s}\n" for c, s in sizes.items())
    bins = sum(-(-s // 25) for s in sizes.values())
    log = os.path.join(work, "log.txt")
    cons, store = os.path.join(work, "consortium"), os.path.join(work, "store")
    model, run = os.path.join(work, "model"), os.path.join(work, "run")
    kv = [f"--{k}={v}" for k, v in {**SIM, "chrom_sizes": sizes_file}.items()]
    rows = [
        run_stage("simulate", ["simulate", cons, "--seed", "1", *kv], cons, log),
        run_stage("ingest", ["ingest", os.path.join(cons, "manifest.tsv"), "--chrom-sizes",
                             sizes_file, "--out", store], store, log),
        run_stage("train", ["train", "--store", store, "--out", model,
                            *[f"--{k}={v}" for k, v in TRAIN.items()]], model, log),
        run_stage("impute+export", ["impute", "--store", store, "--model", model, "--out",
                                    run], run, log),
    ]
    return {"fraction": fraction, "bins": bins, "stages": rows}


def table(results: list[dict]) -> str:
    lines = ["| genome | bins | stage | wall s | CPU s | peak PSS MiB (all processes) | disk MB |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        for s in r["stages"]:
            lines.append(f"| {r['fraction']:g} x hg38 | {r['bins']:,} | {s['stage']} | "
                         f"{s['wall_s']:.0f} | {s['cpu_s']:.0f} | {s['peak_pss_mib']:,.0f} | "
                         f"{s['disk_bytes'] / 1e6:,.0f} |")
        lines.append(f"| {r['fraction']:g} x hg38 | {r['bins']:,} | **all** | "
                     f"{sum(s['wall_s'] for s in r['stages']):.0f} | "
                     f"{sum(s['cpu_s'] for s in r['stages']):.0f} | "
                     f"{max(s['peak_pss_mib'] for s in r['stages']):,.0f} | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="work folder (tens of GB for a whole genome)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5],
                    help="genome sizes to run, as fractions of hg38's chromosomes")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep each genome's files")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results = []
    for fr in a.fractions:
        results.append(run_genome(a.out, fr))
        if not a.keep:
            shutil.rmtree(os.path.join(a.out, f"genome-{fr:g}"), ignore_errors=True)
    doc = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
