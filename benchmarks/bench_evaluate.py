"""Genome-scale evaluation benchmark: seconds and peak memory per track.

Each measurement runs in a fresh process (so its peak RSS is its own) on a synthetic
track pair streamed chunk by chunk, as `edice evaluate` streams bigWigs:

- ``engine``: :func:`edice_dist.metrics.track_metrics` on in-memory generators (the
  metric engine alone: sums, two external sorts, tie-group streaming);
- ``bigwig``: :func:`edice_dist.evaluate.run_job` on truth / imputed bigWigs and a peak
  BED written beforehand (adds the 25 bp bigWig reads and the BED masks).

The signal imitates arcsinh(-log10 p): ~60 % exact zeros (one huge tie group), values
quantised to 1/100 (many ties), an imputation correlated with the truth, and peaks of
400 bp about one per 25 kb (as real peak sets: ~120 k on hg38).

Usage::

    python benchmarks/bench_evaluate.py                    # engine 5M 20M 60M, bigwig 5M 20M
    python benchmarks/bench_evaluate.py --sizes 5e6 2e7 --modes engine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HG38_BINS = 124_000_000
CHUNK = 1 << 17


_POOL: list = []


def chunk_pair(i: int, n: int):
    """Chunk ``i`` of the synthetic truth, imputation and peak mask, shape (n,) each.

    Eight random base chunks are drawn once and reused shifted, so that making chunks
    costs little next to the metrics and holds no more than the pool."""
    if not _POOL:
        for k in range(8):
            rng = np.random.default_rng([7, k])
            on = rng.random(CHUNK) < 0.4
            t = np.where(on, np.round(rng.gamma(0.6, 1.5, CHUNK), 2), 0.0)
            y = np.maximum(0.0, np.round(0.7 * t + rng.normal(0, 0.5, CHUNK), 2))
            # Peaks: 400 bp blocks, ~1 per 1000 bins (~120 k peaks on hg38, as real sets).
            peaks = np.repeat(rng.random(CHUNK // 16) < 0.016, 16)
            t[peaks] += rng.gamma(2.0, 2.0, int(peaks.sum()))
            _POOL.append((np.arcsinh(t).astype(np.float32), np.arcsinh(y).astype(np.float32),
                          peaks))
    shift = (i * 7919) % CHUNK
    return tuple(np.roll(a, shift)[:n] for a in _POOL[i % len(_POOL)])


def gen(n_bins: int, which: int):
    for i, s in enumerate(range(0, n_bins, CHUNK)):
        yield chunk_pair(i, min(CHUNK, n_bins - s))[which]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_engine(n_bins: int, tmpdir: str) -> dict:
    from edice_dist.metrics import track_metrics

    chunk_pair(0, 1)  # fill the pool outside the timing
    t0, c0 = time.perf_counter(), _cpu()
    m = track_metrics(gen(n_bins, 0), gen(n_bins, 1), gen(n_bins, 2), tmpdir=tmpdir)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0,
            "gwcorr": m["gwcorr"], "auprc": m["auprc"]}


def write_bigwigs(n_bins: int, folder: str) -> None:
    """A genome of 1 to 4 chromosomes totalling n_bins: truth and imputation in -log10 p,
    and the truth's peaks as a BED."""
    import pyBigWig

    paths, chroms = _bigwig_paths(n_bins, folder)
    bws = [pyBigWig.open(p, "w") for p in paths[:2]]
    for bw in bws:
        bw.addHeader(chroms, maxZooms=0)
    i = 0
    with open(paths[2], "w") as bed:
        for c, size in chroms:
            nb = size // 25
            for s in range(0, nb, CHUNK):
                t, y, p = chunk_pair(i, min(CHUNK, nb - s))
                i += 1
                for bw, v in zip(bws, (t, y), strict=True):
                    bw.addEntries(c, s * 25, values=np.sinh(v.astype(np.float64)), span=25, step=25)
                edges = np.flatnonzero(np.diff(np.concatenate(([0], p.astype(np.int8), [0]))))
                bed.writelines(f"{c}\t{(s + a) * 25}\t{(s + b) * 25}\n"
                               for a, b in zip(edges[::2], edges[1::2], strict=True))
    for bw in bws:
        bw.close()


def _bigwig_paths(n_bins: int, folder: str):
    n_chroms = max(1, min(4, n_bins // 5_000_000))
    per = [n_bins // n_chroms] * n_chroms
    per[-1] += n_bins - sum(per)
    chroms = [(f"chr{k + 1}", nb * 25) for k, nb in enumerate(per)]
    return [os.path.join(folder, f) for f in ("truth.bw", "imp.bw", "peaks.bed")], chroms


def run_bigwig(n_bins: int, folder: str) -> dict:
    """Evaluate the files that ``write`` made in ``folder`` (a separate process, so the
    bigWig writer's index does not count in this peak RSS)."""
    from edice_dist.evaluate import Job, run_job
    from edice_dist.genome import Genome
    from edice_dist.truth import TruthTrack

    (truth, imp, bed), chroms = _bigwig_paths(n_bins, folder)
    genome = Genome(tuple(c for c, _ in chroms), tuple(s for _, s in chroms))
    job = Job(TruthTrack("cell", "assay", truth, bed), "model", genome, "arcsinh",
              pred_path=imp, pred_space="pval", tmpdir=folder)
    t0, c0 = time.perf_counter(), _cpu()
    m = run_job(job)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0,
            "gwcorr": m["gwcorr"], "auprc": m["auprc"]}


def child(mode: str, n_bins: int, folder: str) -> None:
    if mode == "write":
        write_bigwigs(n_bins, folder)
        return
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "engine":
        with tempfile.TemporaryDirectory(prefix="edice-bench-", dir=folder) as tmp:
            out = run_engine(n_bins, tmp)
    else:
        out = run_bigwig(n_bins, folder)
    out.update(mode=mode, n_bins=n_bins, peak_rss_mib=resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, import_rss_mib=base / 1024)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=None)
    ap.add_argument("--modes", nargs="+", default=["engine", "bigwig"],
                    choices=["engine", "bigwig"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--tmpdir", default=None, help="folder for files and sort runs")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(float(a.child[1])), a.child[2])
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'mode':<7} {'bins':>12} {'wall s':>7} {'CPU s':>7} {'CPU s/M bins':>13} "
          f"{'peak RSS MiB':>13} {'est. CPU s @124M':>17}")
    defaults = {"engine": [5e6, 2e7, 6e7], "bigwig": [5e6, 2e7]}

    def run(*args):
        r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        return r.stdout

    for mode in a.modes:
        for n in a.sizes or defaults[mode]:
            with tempfile.TemporaryDirectory(prefix="edice-bench-", dir=a.tmpdir) as folder:
                if mode == "bigwig":
                    run("write", int(n), folder)
                d = json.loads(run(mode, int(n), folder).strip().splitlines()[-1])
            per_m = d["cpu_seconds"] / (d["n_bins"] / 1e6)
            print(f"{mode:<7} {d['n_bins']:>12,} {d['seconds']:>7.1f} {d['cpu_seconds']:>7.1f} "
                  f"{per_m:>13.3f} {d['peak_rss_mib']:>13.0f} {per_m * HG38_BINS / 1e6:>17.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
