"""Ingest benchmark: store dtype and codec, chunk size, throughput and peak memory.

Usage::

    python benchmarks/bench_ingest.py [--out benchmarks/out/ingest] [--tracks 50]
                                      [--bins 5000000] [--scale 4] [--workers 2]

1. A small consortium from :mod:`edice_dist.simulate` (its -log10 p bins are the value
   templates of everything below; a gamma-mixture stand-in when the simulator is absent).
2. dtype x codec: bytes per bin x track, write and read rates (best of 3), and the error
   in arcsinh space against float64.
3. chunk size: bytes and read rates (best of 3) of sequential and random whole chunks
   (the imputation and training access patterns).
4. throughput: ``--tracks`` fixed-step 25 bp bigWigs (template values tiled with
   per-track, per-chromosome offsets) over a genome of ``--bins`` bins, then one
   ``--scale`` times longer (longer chromosomes, same count), each ingested by
   ``edice ingest`` in a fresh process; peak RSS of the driver and Ray workers is sampled
   from /proc every 0.2 s.

Prints markdown tables; ``results.json`` in ``--out`` holds the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pyBigWig
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from edice_dist.genome import Genome, read_chrom_sizes  # noqa: E402
from edice_dist.sources import open_source  # noqa: E402
from edice_dist.tracks import read_manifest  # noqa: E402

N_CHROMS = 4
TEMPLATE_BINS = 500_000
REPEATS = 3


# ------------------------------------------------------------------ templates
def templates(out: str, seed: int = 0) -> np.ndarray:
    """-log10 p bins of a simulated consortium, shape (TEMPLATE_BINS-ish, n_tracks), float32."""
    try:
        from edice_dist.simulate import SimConfig, simulate
    except ImportError:
        simulate = None
    if simulate is None:
        rng = np.random.default_rng(seed)
        base = rng.exponential(1 / np.log(10), (TEMPLATE_BINS, 60))
        peaks = rng.random((TEMPLATE_BINS, 60)) < 0.02
        base[peaks] += rng.gamma(2.0, 10.0, int(peaks.sum()))
        return base.astype(np.float32)
    sim = os.path.join(out, "sim")
    simulate(sim, SimConfig(seed=seed, genome_bp=TEMPLATE_BINS * 25, n_chroms=3, workers=2))
    tracks = read_manifest(os.path.join(sim, "manifest.tsv"))
    genome = read_chrom_sizes(os.path.join(sim, "chrom.sizes"))
    cols = []
    for t in tracks:
        with open_source(t.path, genome, t.track_id) as s:
            cols.append(np.concatenate([s.binned(c, 0, genome.n_bins(c)) for c in genome.chroms]))
    return np.stack(cols, axis=1).astype(np.float32)


# ------------------------------------------------------------------ codecs
def codec_table(x: np.ndarray, out: str, chunk_bins: int = 16384) -> list[dict]:
    """Write arcsinh(x) with every (dtype, codec) pair; sizes, times and errors."""
    ref = np.arcsinh(x.astype(np.float64))
    codecs = {
        "none": [],
        "blosc-lz4-shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        "blosc-lz4-bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
        "blosc-zstd3-noshuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")],
        "blosc-zstd3-shuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
        "blosc-zstd3-bitshuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
        "blosc-zstd5-bitshuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")],
        "zstd3": [ZstdCodec(level=3)],
    }
    rows = []
    for dtype in ("float16", "float32"):
        data = ref.astype(dtype)
        err = np.abs(data.astype(np.float64) - ref)
        for name, comp in codecs.items():
            path = os.path.join(out, "codecs", f"{dtype}-{name}")
            shutil.rmtree(path, ignore_errors=True)
            arr = zarr.create_array(path, shape=data.shape, chunks=(chunk_bins, data.shape[1]),
                                    dtype=dtype, compressors=comp, fill_value=0)
            tw = tr = float("inf")
            for _ in range(REPEATS):  # best of a few: the box is shared
                t0 = time.perf_counter()
                for a in range(0, data.shape[0], chunk_bins):
                    arr[a:a + chunk_bins] = data[a:a + chunk_bins]
                tw = min(tw, time.perf_counter() - t0)
                t0 = time.perf_counter()
                back = arr[:]
                tr = min(tr, time.perf_counter() - t0)
            assert np.array_equal(back, data)
            nbytes = _du(path)
            rows.append({"dtype": dtype, "codec": name, "bytes_per_value": nbytes / data.size,
                         "write_mvals_s": data.size / tw / 1e6, "read_mvals_s": data.size / tr / 1e6,
                         "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean())})
            shutil.rmtree(path, ignore_errors=True)
    return rows


def chunk_table(x: np.ndarray, out: str, dtype: str, comp: list, sizes=(4096, 16384, 65536),
                seed: int = 0) -> list[dict]:
    data = np.arcsinh(x.astype(np.float64)).astype(dtype)
    rng = np.random.default_rng(seed)
    rows = []
    for cb in sizes:
        path = os.path.join(out, "chunks", str(cb))
        shutil.rmtree(path, ignore_errors=True)
        arr = zarr.create_array(path, shape=data.shape, chunks=(cb, data.shape[1]), dtype=dtype,
                                compressors=comp, fill_value=0)
        for a in range(0, data.shape[0], cb):
            arr[a:a + cb] = data[a:a + cb]
        n_chunks = -(-data.shape[0] // cb)
        seq = rnd = 0.0
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for i in range(n_chunks):
                arr[i * cb:(i + 1) * cb]
            seq = max(seq, data.shape[0] / (time.perf_counter() - t0))
            picks = rng.integers(0, n_chunks, n_chunks)
            t0 = time.perf_counter()
            got = 0
            for i in picks:
                got += arr[i * cb:(i + 1) * cb].shape[0]
            rnd = max(rnd, got / (time.perf_counter() - t0))
        rows.append({"chunk_bins": cb, "bytes_per_value": _du(path) / data.size,
                     "chunk_mib_decoded": cb * data.shape[1] * data.itemsize / 2**20,
                     "seq_mbins_s": seq / 1e6, "random_mbins_s": rnd / 1e6})
        shutil.rmtree(path, ignore_errors=True)
    return rows


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ------------------------------------------------------------------ sources
def _write_track(args) -> None:
    path, col, genome_items, seed = args
    tpl = _TPL[:, col].astype(np.float64)
    n = len(tpl)
    bw = pyBigWig.open(path, "w")
    bw.addHeader(genome_items, maxZooms=0)
    for k, (chrom, size) in enumerate(genome_items):
        nb = size // 25  # the last partial bin is left as a gap (reads as 0)
        off = (seed * 7919 + k * 104729) % n
        for a in range(0, nb, 1_000_000):
            b = min(a + 1_000_000, nb)
            vals = tpl[(np.arange(a, b) + off) % n]
            bw.addEntries(chrom, a * 25, values=vals, span=25, step=25)
    bw.close()


_TPL: np.ndarray | None = None


def write_sources(out: str, tpl: np.ndarray, n_tracks: int, n_bins: int) -> tuple[str, str]:
    """Fixed-step bigWigs of ``n_tracks`` tracks over ``N_CHROMS`` chromosomes."""
    global _TPL
    os.makedirs(out, exist_ok=True)
    per = n_bins // N_CHROMS
    genome = [(f"chr{i + 1}", per * 25 - 7) for i in range(N_CHROMS)]  # odd sizes: partial bins
    with open(os.path.join(out, "chrom.sizes"), "w") as f:
        f.writelines(f"{c}\t{s}\n" for c, s in genome)
    _TPL = tpl
    jobs, rows = [], ["cell_type\tassay\tpath"]
    for j in range(n_tracks):
        name = f"t{j:03d}.bw"
        jobs.append((os.path.join(out, name), j % tpl.shape[1], genome, j))
        rows.append(f"C{j // 8}\tA{j % 8}\t{name}")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_write_track, jobs)
    with open(os.path.join(out, "manifest.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return os.path.join(out, "manifest.tsv"), os.path.join(out, "chrom.sizes")


# ------------------------------------------------------------------ memory
def _tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _sample(pid: int, driver: int) -> tuple[int, float, str]:
    """(RSS bytes, CPU seconds so far, kind) of one process."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return 0, 0.0, "gone"
    if pid == driver:
        return rss, cpu, "driver"
    return rss, cpu, "worker" if cmd.startswith("ray::") else "daemon"


class MemSampler(threading.Thread):
    """Peak summed RSS of a process tree (driver + Ray workers, and with Ray's daemons),
    and the CPU seconds of the driver and workers (as last seen, every ``every`` s)."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_work = self.peak_all = 0
        self.peak_worker_single = 0
        self.cpu: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            work = daemons = 0
            for p in _tree(self.pid):
                rss, cpu, kind = _sample(p, self.pid)
                if kind in ("driver", "worker"):
                    work += rss
                    self.cpu[p] = max(self.cpu.get(p, 0.0), cpu)
                    if kind == "worker":
                        self.peak_worker_single = max(self.peak_worker_single, rss)
                else:
                    daemons += rss
            self.peak_work = max(self.peak_work, work)
            self.peak_all = max(self.peak_all, work + daemons)
            self.stop.wait(self.every)


def run_ingest(manifest: str, sizes: str, store: str, workers: int) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(store + ".partial", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."),
               RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, "-m", "edice_dist.cli", "ingest", manifest, "--chrom-sizes", sizes,
           "--out", store, "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)
    mem = MemSampler(proc.pid)
    mem.start()
    marks = {}
    for line in proc.stderr:
        now = time.perf_counter() - t0
        if line.startswith("[") and "/4]" in line[:6]:
            marks[line[1]] = now
        if not line.startswith("(raylet)"):
            sys.stderr.write(line)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    mem.stop.set()
    mem.join()
    if rc:
        raise SystemExit(f"ingest failed with status {rc}")
    return {"wall_s": wall, "encode_s": marks["4"] - marks["3"],
            "cpu_s": sum(mem.cpu.values()),
            "peak_driver_workers_mib": mem.peak_work / 2**20,
            "peak_single_worker_mib": mem.peak_worker_single / 2**20,
            "peak_all_mib": mem.peak_all / 2**20, "store_bytes": _du(store)}


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "ingest"))
    p.add_argument("--tracks", type=int, default=50)
    p.add_argument("--bins", type=int, default=5_000_000)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the bigWigs and stores")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    res: dict = {"args": vars(a), "date": time.strftime("%Y-%m-%d"),
                 "load_start": os.getloadavg()[0]}

    t0 = time.perf_counter()
    tpl = templates(a.out)
    print(f"templates: {tpl.shape[0]:,} bins x {tpl.shape[1]} tracks "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    res["codecs"] = codec_table(tpl, a.out)
    print("\n### dtype and codec (chunks of 16384 bins x all tracks)\n")
    print("| dtype | codec | bytes / bin x track | write Mvalues/s | read Mvalues/s | "
          "max abs err | mean abs err |")
    print("|---|---|---|---|---|---|---|")
    for r in res["codecs"]:
        print(f"| {r['dtype']} | {r['codec']} | {r['bytes_per_value']:.3f} | "
              f"{r['write_mvals_s']:.0f} | {r['read_mvals_s']:.0f} | {r['max_abs_err']:.2e} | "
              f"{r['mean_abs_err']:.2e} |")

    from edice_dist import store as store_mod

    res["chunks"] = chunk_table(tpl, a.out, store_mod.DEFAULT_DTYPE,
                                store_mod.default_codecs(store_mod.DEFAULT_DTYPE))
    print(f"\n### chunk size ({store_mod.DEFAULT_DTYPE}, default codec, "
          f"{tpl.shape[1]} tracks)\n")
    print("| chunk bins | bytes / bin x track | decoded chunk MiB | sequential Mbins/s | "
          "random chunks Mbins/s |")
    print("|---|---|---|---|---|")
    for r in res["chunks"]:
        print(f"| {r['chunk_bins']} | {r['bytes_per_value']:.3f} | {r['chunk_mib_decoded']:.1f} | "
              f"{r['seq_mbins_s']:.2f} | {r['random_mbins_s']:.2f} |")

    res["ingest"] = []
    for k in (1, a.scale):
        n_bins = a.bins * k
        src = os.path.join(a.out, f"src-{k}x")
        t0 = time.perf_counter()
        manifest, sizes = write_sources(src, tpl, a.tracks, n_bins)
        tw = time.perf_counter() - t0
        print(f"sources {k}x: {a.tracks} bigWigs of {n_bins:,} bins written in {tw:.0f} s",
              file=sys.stderr)
        genome: Genome = read_chrom_sizes(sizes)
        r = run_ingest(manifest, sizes, os.path.join(a.out, f"store-{k}x"), a.workers)
        cells = genome.total_bins * a.tracks
        r.update({"scale": k, "bins": genome.total_bins, "tracks": a.tracks,
                  "encode_mcells_s": cells / r["encode_s"] / 1e6,
                  "total_mcells_s": cells / r["wall_s"] / 1e6,
                  "cpu_s_per_gcell": r["cpu_s"] / cells * 1e9,
                  "bytes_per_value": r["store_bytes"] / cells})
        res["ingest"].append(r)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(os.path.join(a.out, f"store-{k}x"), ignore_errors=True)
    print(f"\n### throughput ({a.workers} workers, {store_mod.DEFAULT_DTYPE}, chunks of "
          f"{store_mod.DEFAULT_CHUNK_BINS} bins, fixed-step 25 bp bigWig sources)\n")
    print("| genome bins | tracks | wall s | encode s | encode Mbins x tracks/s | "
          "overall Mbins x tracks/s | CPU s (driver+workers) | CPU s per G bins x tracks | "
          "peak RSS driver+workers MiB | peak RSS one worker MiB | "
          "peak RSS incl. Ray daemons MiB | bytes / bin x track |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["ingest"]:
        print(f"| {r['bins']:,} | {r['tracks']} | {r['wall_s']:.0f} | {r['encode_s']:.0f} | "
              f"{r['encode_mcells_s']:.1f} | {r['total_mcells_s']:.1f} | {r['cpu_s']:.0f} | "
              f"{r['cpu_s_per_gcell']:.0f} | "
              f"{r['peak_driver_workers_mib']:.0f} | {r['peak_single_worker_mib']:.0f} | "
              f"{r['peak_all_mib']:.0f} | {r['bytes_per_value']:.3f} |")
    res["load_end"] = os.getloadavg()[0]
    print(f"\nload average (1 min): {res['load_start']:.1f} at the start, "
          f"{res['load_end']:.1f} at the end")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
