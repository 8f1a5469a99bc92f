"""Accuracy on real Roadmap tracks: 5 cell types x 5 histone marks, the ENCODE pilot regions.

    python benchmarks/bench_real.py [--data DIR] [--out DIR] [--splits 0 1]
        [--variants default noskip] [--bins N] [--json OUT]

The data are the 25 files ``{CELL}.{MARK}.pilot.arcsinh.npz`` that the Avocado repository
ships (github.com/jmschrei/avocado, ``data/``, added in commit be5dad9f; Apache-2.0;
Roadmap Epigenomics Consortium 2015, Schreiber et al. 2020): arcsinh(-log10 p) of the
Roadmap consolidated tracks of E003 (H1), E017 (IMR-90), E065 (aorta), E116 (GM12878) and
E117 (HeLa-S3) for H3K4me3, H3K4me1, H3K36me3, H3K27me3 and H3K9me3, in 25 bp bins over the
ENCODE pilot regions of hg19 (1,126,469 bins, 28 Mbp, concatenated without coordinates).
They are not part of this repository. The benchmark looks for them in ``--data``, then
``$EDICE_REAL_DATA``, then ``../shared/data/avocado-pilot`` beside the checkout, and exits 0
with a message saying so when they are absent (no network at run time).

Each split holds out 5 of the 25 tracks, one per cell type and one per mark (a Latin
square drawn from the split's seed); the other 20 are the observed consortium. The tracks
become bigWigs of -log10 p (``sinh`` of the values) on one pseudo-chromosome, ``pilot``;
then every variant of ``bench_accuracy.py`` trains with the same small settings, imputes
the held-out tracks and is scored by ``edice evaluate`` beside AVG, peaks being the bins
with -log10 p >= 2 (the evaluation's default without peak files).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bench_accuracy as acc  # noqa: E402  (benchmarks/ is not a package)

CELLS = ("E003", "E017", "E065", "E116", "E117")
MARKS = ("H3K4me3", "H3K4me1", "H3K36me3", "H3K27me3", "H3K9me3")
CHROM = "pilot"
BIN = 25


def find_data(given: str | None) -> str | None:
    """The first folder that holds all 25 files, or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (given, os.environ.get("EDICE_REAL_DATA"),
              os.path.join(here, "..", "..", "shared", "data", "avocado-pilot")):
        if d and all(os.path.exists(os.path.join(d, f"{c}.{m}.pilot.arcsinh.npz"))
                     for c in CELLS for m in MARKS):
            return d
    return None


def held_out(split: int) -> list[tuple[str, str]]:
    """One track per cell type and per mark: cell i gets mark perm[i]."""
    perm = np.random.default_rng(1000 + split).permutation(len(MARKS))
    return [(c, MARKS[p]) for c, p in zip(CELLS, perm, strict=True)]


def write_bigwig(path: str, pval: np.ndarray) -> None:
    import pyBigWig

    tmp = path + ".part"
    bw = pyBigWig.open(tmp, "w")
    bw.addHeader([(CHROM, len(pval) * BIN)], maxZooms=0)
    bw.addEntries(CHROM, 0, values=pval.astype(np.float64).tolist(), span=BIN, step=BIN)
    bw.close()
    os.replace(tmp, path)


def consortium(root: str, data: str, split: int, n_bins: int | None) -> dict:
    """Write the split's observed bigWigs, manifest and truth, and ingest them (each step
    skipped when already done)."""
    from edice_dist.ingest import ingest

    d = os.path.join(root, f"real{split}")
    sim = os.path.join(d, "consortium")
    os.makedirs(os.path.join(sim, "truth"), exist_ok=True)
    hidden = set(held_out(split))
    rows, truth = [], []
    with np.load(os.path.join(data, f"{CELLS[0]}.{MARKS[0]}.pilot.arcsinh.npz")) as z:
        n = len(z["arr_0"])
    size = min(n, n_bins or n) * BIN
    for c in CELLS:
        for m in MARKS:
            sub = "truth" if (c, m) in hidden else "observed"
            os.makedirs(os.path.join(sim, sub), exist_ok=True)
            rel = f"{sub}/{c}-{m}.bigWig"
            path = os.path.join(sim, rel)
            if not os.path.exists(path):
                with np.load(os.path.join(data, f"{c}.{m}.pilot.arcsinh.npz")) as z:
                    v = np.asarray(z["arr_0"], dtype=np.float32)[:n_bins]
                if len(v) * BIN != size:
                    raise SystemExit(f"bench_real: {c}.{m} has {len(v)} bins, "
                                     f"{CELLS[0]}.{MARKS[0]} {size // BIN}: not one set")
                write_bigwig(path, np.sinh(np.maximum(v, 0)))
            (truth if (c, m) in hidden else rows).append(f"{c}\t{m}\t{rel}")
    with open(os.path.join(sim, "chrom.sizes"), "w") as f:
        f.write(f"{CHROM}\t{size}\n")
    with open(os.path.join(sim, "manifest.tsv"), "w") as f:
        f.write("cell_type\tassay\tpath\n" + "\n".join(rows) + "\n")
    with open(os.path.join(sim, "truth", "targets.tsv"), "w") as f:
        f.write("cell_type\tassay\tpath\n"
                + "\n".join(r.replace("\ttruth/", "\t") for r in truth) + "\n")
    store = os.path.join(d, "store")
    if not os.path.exists(store):
        ingest(os.path.join(sim, "manifest.tsv"), os.path.join(sim, "chrom.sizes"), store)
    return {"dir": d, "sim": sim, "store": store,
            "truth": os.path.join(sim, "truth", "targets.tsv")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="folder of the 25 Avocado pilot .npz files")
    ap.add_argument("--out", default="benchmarks/out/real")
    ap.add_argument("--splits", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["default", "noskip"],
                    choices=sorted(acc.VARIANTS))
    ap.add_argument("--bins", type=int, help="use only the first N bins")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="training settings for every variant (e.g. cpus_per_worker=1)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    data = find_data(a.data)
    if data is None:
        print("bench_real: skipped: the Avocado pilot tracks ({CELL}.{MARK}.pilot.arcsinh.npz "
              "of github.com/jmschrei/avocado data/) are not in --data, $EDICE_REAL_DATA or "
              "../shared/data/avocado-pilot. Put the 25 files in one of them to run it.")
        return 0
    from edice_dist import raycluster

    raycluster.init()
    print(f"# bench_real: {_dt.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; data {data}; settings {acc.SMALL}")
    extra = dict(kv.split("=", 1) for kv in a.set)
    results = {}
    for split in a.splits:
        print(f"== split {split}: held out {held_out(split)}", flush=True)
        c = consortium(a.out, data, split, a.bins)
        per = {v: acc.run_variant(c, v, extra) for v in a.variants}
        results[f"real{split}"] = per
        first = per[a.variants[0]]["tracks"]
        rows = {v: acc.summarise(per[v]["tracks"], "model") for v in per}
        rows["AVG"] = acc.summarise(first, "AVG")
        print(acc.table(rows))
        merged = {k: {"AVG": v["AVG"], **{n: per[n]["tracks"][k]["model"] for n in per}}
                  for k, v in first.items()}
        print(acc.per_assay(merged, [*per, "AVG"]))
        for v in a.variants:
            print(f"  {v} beats AVG on {acc.wins(per[v]['tracks'], 'model')} tracks")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({n: {v: {"summary": acc.summarise(r[v]["tracks"], "model"),
                               "avg": acc.summarise(r[v]["tracks"], "AVG")} for v in r}
                       for n, r in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
