"""Training benchmark: bins/s per worker with the paper's model, FLOP/s against the
measured matmul rate, peak memory, and the sampler's read rate.

    python benchmarks/bench_train.py [--steps N] [--json OUT.json]
        [--sampler-only] [--sampler-context none 4,20,100 ...]

Measures, on the machine it runs on:

1. the torch matmul rate (FLOP/s) of fp32 and bf16 at 1 and 2 threads, at the start and the
   end of the run (the box may be shared: the best is taken as the peak);
2. one training worker's throughput with the paper's model (127 cell types x 24 assays,
   5,985,025 parameters; 1,014 observed tracks as in Roadmap, 120 targets per bin, 256
   bins per step; forward, backward and Adam): bins/s, the FLOP/s achieved (FLOPs counted by
   ``torch.utils.flop_counter`` on one step) and its ratio to the matmul rate of the same
   dtype and thread count, and the worker's peak RSS. fp32 is what training uses on a CPU;
   bf16 autocast is shown for comparison (it is what the GPU path uses);
3. the sampler (:class:`edice_dist.sampler.TrainSampler`) reading a 1,014-track float16
   store: bins/s per worker, to show that the data path is not what limits training;
   with each local context of ``--sampler-context`` (half-widths, ``none`` for the
   paper's inputs), whose widest window sets the halo read around every block.

Each training measurement runs in its own process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edice_dist.model import EDICE, ModelConfig  # noqa: E402

N_CELLS, N_ASSAYS, N_TRACKS, N_TARGETS, BATCH = 127, 24, 1014, 120, 256


def matmul_rate(dtype: torch.dtype, threads: int, m=8192, n=2048, k=2048, reps=5) -> float:
    """Best-of-``reps`` FLOP/s of an (m x k) @ (k x n) product (the decoder's shape)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    best = 0.0
    with torch.inference_mode():
        F.linear(a, b)
        for _ in range(reps):
            t = time.perf_counter()
            F.linear(a, b)
            best = max(best, 2 * m * n * k / (time.perf_counter() - t))
    return best


def paper_batch(seed: int = 0):
    """A training batch shaped like Roadmap's: 1,014 observed tracks over 127 x 24."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(N_CELLS * N_ASSAYS, size=N_TRACKS, replace=False)
    tc = torch.from_numpy(pairs // N_ASSAYS)
    ta = torch.from_numpy(pairs % N_ASSAYS)
    x = torch.from_numpy(np.arcsinh(rng.gamma(0.5, 3.0, (BATCH, N_TRACKS))).astype(np.float32))
    noise = rng.random((BATCH, N_TRACKS))
    target = torch.from_numpy(np.argpartition(noise, N_TARGETS - 1, axis=1)[:, :N_TARGETS])
    support = torch.ones(BATCH, N_TRACKS, dtype=torch.bool)
    support.scatter_(1, target, False)
    y = x.gather(1, target)
    return x, support, tc, ta, target, y


def train_part(dtype: str, threads: int, steps: int) -> dict:
    """Run in a child process: steps/s of forward + backward + Adam on the paper model."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = EDICE(ModelConfig(N_CELLS, N_ASSAYS)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    x, support, tc, ta, target, y = paper_batch()
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
           else torch.autocast("cpu", enabled=False))

    def step():
        with ctx:
            pred = model(x, support, tc, ta, tc[target], ta[target])
        loss = F.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()  # also the warm-up
    flops = fc.get_total_flops()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"dtype": dtype, "threads": threads, "steps": steps,
            "step_s": best, "step_s_median": float(np.median(times)),
            "bins_per_s": BATCH / best, "flops_per_step": flops, "flop_per_s": flops / best,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def sampler_part(threads: int, context: str = "none") -> dict:
    """Run in a child process: bins/s of TrainSampler over a 1,014-track float16 store,
    with the local context ``context`` (``4,20,100``; ``none``)."""
    import zarr

    from edice_dist import storage, store
    from edice_dist.config import convert
    from edice_dist.genome import Genome
    from edice_dist.sampler import TrainSampler
    from edice_dist.tracks import Track

    torch.set_num_threads(threads)
    n_bins, chunk = 4 * 16384, 16384
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        path = os.path.join(tmp, "store")
        tracks = [Track(f"c{i // N_ASSAYS:03d}", f"a{i % N_ASSAYS:02d}", "x") for i in range(N_TRACKS)]
        store.create(path, Genome(("chr1",), (25 * n_bins,)), tracks, chunk_bins=chunk)
        arr = zarr.open_group(storage.zarr_store(path), mode="r+")["signal"]["chr1"]
        for s in range(0, n_bins, chunk):
            arr[s:s + chunk] = np.arcsinh(rng.gamma(0.5, 3.0, (chunk, N_TRACKS))).astype(np.float16)
        store.mark_complete(path)
        st = store.open_store(path)
        ctx = convert(context, tuple[int, ...], "context", "--sampler-context")
        sampler = TrainSampler(st, np.arange(N_TRACKS), N_TARGETS, BATCH, seed=0, context=ctx)
        t = time.perf_counter()
        n = sum(b.x.shape[0] for b in sampler.batches(0))
        dt = time.perf_counter() - t
    return {"threads": threads, "context": context, "bins": n, "seconds": dt,
            "bins_per_s": n / dt,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child(part: str, *args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--part", part, *map(str, args)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sampler_runs(contexts: list[str]) -> list[dict]:
    """The sampler timed with each context, interleaved twice so that a shared box slows
    each alike; the faster of its two runs is kept."""
    best: dict[str, dict] = {}
    for _ in range(2):
        for c in contexts:
            r = child("sampler", 1, c)
            if c not in best or r["bins_per_s"] > best[c]["bins_per_s"]:
                best[c] = r
    for c in contexts:
        print(f"sampler, context {c}: {best[c]['bins_per_s']:,.0f} bins/s (1,014 float16 "
              f"tracks), peak RSS {best[c]['peak_rss_gib']:.2f} GiB", flush=True)
    return [best[c] for c in contexts]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--sampler-only", action="store_true", help="time the sampler alone")
    ap.add_argument("--sampler-context", nargs="+", default=["none"], metavar="CONTEXT",
                    help="local contexts to time the sampler with (none, 4,20,100, ...)")
    ap.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.part:
        kind, *rest = a.part
        res = (train_part(rest[0], int(rest[1]), int(rest[2])) if kind == "train"
               else sampler_part(int(rest[0]), *rest[1:]))
        print(json.dumps(res))
        return res

    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    res = {"date": _dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cores": cores, "torch": torch.__version__, "load_avg_start": os.getloadavg()}
    peaks = {}

    def measure_peaks(tag):
        for dt in (torch.float32, torch.bfloat16):
            for t in threads:
                r = matmul_rate(dt, t)
                key = f"{str(dt).split('.')[1]}@{t}"
                peaks[key] = max(peaks.get(key, 0.0), r)
                print(f"matmul {key} ({tag}): {r / 1e9:.1f} GFLOP/s", flush=True)

    if a.sampler_only:
        res["sampler"] = sampler_runs(a.sampler_context)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
        return res
    measure_peaks("start")
    runs = []
    for dt in ("float32", "bfloat16"):
        for t in threads:
            r = child("train", dt, t, a.steps)
            runs.append(r)
            print(f"train step {dt} x {t} thread(s): {r['bins_per_s']:.1f} bins/s, "
                  f"{r['flop_per_s'] / 1e9:.1f} GFLOP/s, peak RSS {r['peak_rss_gib']:.2f} GiB",
                  flush=True)
    sampler = sampler_runs(a.sampler_context)
    measure_peaks("end")
    for r in runs:
        key = f"{r['dtype']}@{r['threads']}"
        r["matmul_peak_flop_per_s"] = peaks[key]
        r["ratio_to_matmul_peak"] = r["flop_per_s"] / peaks[key]
    res.update(matmul_peak=peaks, train=runs, sampler=sampler, load_avg_end=os.getloadavg())
    print()
    print("| dtype | threads | bins/s per worker | GFLOP/step | achieved GFLOP/s | matmul peak "
          "GFLOP/s | ratio | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['dtype']} | {r['threads']} | {r['bins_per_s']:.1f} | "
              f"{r['flops_per_step'] / 1e9:.0f} | {r['flop_per_s'] / 1e9:.1f} | "
              f"{r['matmul_peak_flop_per_s'] / 1e9:.1f} | {r['ratio_to_matmul_peak']:.2f} | "
              f"{r['peak_rss_gib']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
