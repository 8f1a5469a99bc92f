"""Imputation and export benchmark: throughput, matmul-peak ratio, bf16 accuracy, memory.

    python benchmarks/bench_impute.py [--quick] [--json OUT.json]

Measures, on the machine it runs on:

1. the torch matmul rate of fp32 and bf16 (the peak to compare against), at the start and
   the end of the run (the box may be shared: the best of the two is the peak);
2. the accuracy cost of bf16 against fp32 on the paper-size model;
3. ``predict_chunk`` throughput (target-bins/s and FLOP/s as a ratio to the matmul rate
   of the same dtype) for fp32, bf16 eager and bf16 compiled;
4. ``edice impute`` end to end with Ray actors on two genome sizes (peak memory per actor
   must not grow with the genome), 1 actor x 2 threads against 2 actors x 1 thread;
5. the export rate (bins/s written to bigWig) and the output layout (sharded or not);
6. the projection for 2,000 tracks over hg38 (124 M bins) on this CPU and on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edice_dist import predict as P  # noqa: E402
from edice_dist.model import EDICE, ModelConfig, decoder_macs  # noqa: E402

HG38_BINS = 124e6
TRACKS = 2000


def matmul_rate(dtype, threads, m=8192, n=2048, k=2048, reps=5) -> float:
    """Best-of-``reps`` FLOP/s of an (m x k) @ (k x n) product, the decoder's shape."""
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    best = 0.0
    with torch.inference_mode():
        torch.nn.functional.linear(a, b)
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best = max(best, 2 * m * n * k / (time.perf_counter() - t))
    return best


def paper_model(n_cells, n_assays, seed=0) -> EDICE:
    torch.manual_seed(seed)
    m = EDICE(ModelConfig(n_cells=n_cells, n_assays=n_assays)).eval()
    return m


def scale_output(model, x, cols, tc, ta, kc, ka):
    """Rescale the output layer so that predictions look like arcsinh(-log10 p):
    mean 1, sd 1 (random weights give outputs near 0 with a tiny spread)."""
    y = P.predict_chunk(model, x[:256], cols, tc, ta, kc, ka, dtype="float32")
    mu, sd = float(y.mean()), float(y.std())
    with torch.no_grad():
        model.output.weight.mul_(1.0 / sd)
        model.output.bias.sub_(mu).div_(sd).add_(1.0)


def make_inputs(n_cells, n_assays, n_tracks, n_targets, n_bins, seed=0):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_cells * n_assays, size=n_tracks + n_targets, replace=False)
    obs, tgt = pairs[:n_tracks], pairs[n_tracks:]
    x = np.arcsinh(rng.gamma(0.5, 3.0, (n_bins, n_tracks))).astype(np.float32)
    return x, obs // n_assays, obs % n_assays, tgt // n_assays, tgt % n_assays


def bench_accuracy(model, inputs) -> dict:
    x, tc, ta, kc, ka = inputs
    cols = np.arange(x.shape[1])
    ref = P.predict_chunk(P.prepare(model, "cpu", "float32", compile=False), x, cols, tc, ta, kc, ka)
    out = {"ref_sd": float(ref.std()), "ref_range": [float(ref.min()), float(ref.max())]}
    for name, comp in (("bf16_eager", False), ("bf16_compiled", True)):
        y = P.predict_chunk(P.prepare(model, "cpu", "bfloat16", compile=comp), x, cols, tc, ta, kc, ka)
        err = y - ref
        out[name] = {"max_abs": float(np.abs(err).max()), "rms": float(np.sqrt((err ** 2).mean())),
                     "pearson": float(np.corrcoef(y.ravel(), ref.ravel())[0, 1]),
                     "rms_over_sd": float(np.sqrt((err ** 2).mean()) / ref.std())}
    return out


def bench_predict(model, inputs, thread_counts=(1, 2), rounds=3) -> list:
    """Throughput of ``predict_chunk`` for fp32, bf16 eager and bf16 compiled.

    The configurations run interleaved, ``rounds`` times, best of the rounds; each run is
    paired with a matmul-rate measurement of its dtype and thread count taken right after
    it (the box may be shared: only ratios taken under the same conditions mean something).
    """
    x, tc, ta, kc, ka = inputs
    cols = np.arange(x.shape[1])
    K, n = len(kc), x.shape[0]
    flops = P.flops_per_bin(model, K, len(set(kc.tolist())), len(set(ka.tolist()))) * n
    configs = [(th, name, dt, comp) for th in thread_counts
               for name, dt, comp in (("fp32", "float32", False), ("bf16 eager", "bfloat16", False),
                                      ("bf16 compiled", "bfloat16", True))]
    preds = {}
    for th, name, dt, comp in configs:
        torch.set_num_threads(th)
        preds[(th, name)] = P.prepare(model, "cpu", dt, compile=comp)
        P.predict_chunk(preds[(th, name)], x[:64], cols, tc, ta, kc, ka)  # warm up, compile
    best = {}
    for _ in range(rounds):
        for th, name, dt, _comp in configs:
            torch.set_num_threads(th)
            t = time.perf_counter()
            P.predict_chunk(preds[(th, name)], x, cols, tc, ta, kc, ka)
            secs = time.perf_counter() - t
            peak = matmul_rate(torch.float32 if dt == "float32" else torch.bfloat16, th, reps=3)
            ratio = flops / secs / peak
            if (th, name) not in best or secs < best[(th, name)]["seconds"]:
                best[(th, name)] = {"threads": th, "config": name, "seconds": secs,
                                    "target_bins_per_s": K * n / secs, "gflops": flops / secs / 1e9,
                                    "matmul_gflops": peak / 1e9, "ratio_to_matmul": ratio}
    return list(best.values())


# -- end to end with Ray -------------------------------------------------------------------


def build_store(path, n_chroms, chrom_bins, tracks, chunk_bins, seed=0):
    from edice_dist import store as S
    from edice_dist.genome import Genome

    g = Genome(tuple(f"chr{i + 1}" for i in range(n_chroms)),
               tuple(chrom_bins * 25 - 11 for _ in range(n_chroms)))
    root = S.create(path, g, tracks, chunk_bins=chunk_bins)
    rng = np.random.default_rng(seed)
    for c in root.attrs["chroms"]:
        arr = root["signal"][c["array"]]
        for s in range(0, c["n_bins"], chunk_bins):
            e = min(s + chunk_bins, c["n_bins"])
            arr[s:e] = np.arcsinh(rng.gamma(0.5, 3.0, (e - s, len(tracks)))).astype(np.float16)
    S.mark_complete(path)
    return path


def bench_end_to_end(work, model, cells, assays, obs, targets, sizes, chunk_bins, pools) -> list:
    from edice_dist.checkpoint import save_model
    from edice_dist.impute import impute
    from edice_dist.tracks import Track

    model_dir = os.path.join(work, "model")
    save_model(model_dir, model, {"cell_keys": cells, "assays": assays, "transform": "arcsinh"})
    tracks = [Track(cells[c], assays[a]) for c, a in obs]
    spec = ",".join(f"{cells[c]}:{assays[a]}" for c, a in targets)
    rows = []
    for n_chroms, chrom_bins in sizes:
        store = build_store(os.path.join(work, f"store{n_chroms}"), n_chroms, chrom_bins, tracks,
                            chunk_bins)
        for workers in (pools if (n_chroms, chrom_bins) == sizes[0] else pools[:1]):
            run = os.path.join(work, f"run{n_chroms}_{workers}")
            t = time.perf_counter()
            s = impute(store, model_dir, run, targets=spec, workers=workers, export=True)
            wall = time.perf_counter() - t
            a0 = s["actors"][0]
            rows.append({"chroms": n_chroms, "bins": s["bins"], "chunks": s["chunks_total"],
                         "actors": len(s["actors"]), "threads": a0["threads"], "device": a0["device"],
                         "dtype": a0["dtype"], "compiled": a0["compiled"], "targets": s["tracks"], "wall_s": wall,
                         "impute_s": s["seconds"], "target_bins_per_s": s["target_bins_per_s"],
                         "compute_s": sum(a["compute_s"] for a in s["actors"]),
                         "read_wait_s": sum(a["read_wait_s"] for a in s["actors"]),
                         "peak_actor_rss_mib": s["peak_actor_rss_mib"],
                         "export_s": s["export"]["seconds"],
                         "export_bins_per_s": s["export"]["bins_per_s"]})
            if (n_chroms, chrom_bins) == sizes[-1]:
                from edice_dist.export import export

                e = export(run, force=True)  # again, with warm Ray workers
                rows[-1]["export_warm_bins_per_s"] = e["bins_per_s"]
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(run)
        shutil.rmtree(store)
    return rows


def bench_layout(work, K=512, chunk_bins=16384, n_chunks=4) -> dict:
    """Output layouts: writers own whole (K, chunk_bins) units; the reducer reads one target."""
    import zarr

    rng = np.random.default_rng(0)
    data = rng.normal(1, 1, (K, chunk_bins)).astype(np.float32)
    nb = chunk_bins * n_chunks
    out = {}
    layouts = {"sharded (K,cb) / inner (1,cb)": dict(chunks=(1, chunk_bins), shards=(K, chunk_bins)),
               "chunks (K,cb)": dict(chunks=(K, chunk_bins)),
               "chunks (1,cb)": dict(chunks=(1, chunk_bins))}
    for name, kw in layouts.items():
        p = os.path.join(work, "layout.zarr")
        shutil.rmtree(p, ignore_errors=True)
        arr = zarr.create_array(p, shape=(K, nb), dtype="float32", compressors=None, **kw)
        t = time.perf_counter()
        with zarr.config.set({"array.write_empty_chunks": True}):  # as the actors write
            for i in range(n_chunks):
                arr[:, i * chunk_bins:(i + 1) * chunk_bins] = data
        w = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(n_chunks):
            arr[K // 2, i * chunk_bins:(i + 1) * chunk_bins]
        r = time.perf_counter() - t
        files = sum(len(f) for _, _, f in os.walk(p))
        out[name] = {"write_s": w, "write_MBps": K * nb * 4 / w / 1e6, "read_one_target_s": r,
                     "files": files}
        shutil.rmtree(p)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-ray", action="store_true")
    a = ap.parse_args(argv)
    threads = os.cpu_count() or 1
    n_cells, n_assays, n_tracks, n_targets = 24, 10, 60, 16
    res = {"machine": f"{platform.processor() or platform.machine()}, {threads} CPUs, "
                      f"torch {torch.__version__}, fast bf16: {P.cpu_has_fast_bf16()}",
           "date": time.strftime("%Y-%m-%d"), "command": " ".join([sys.argv[0]] + (argv or sys.argv[1:]))}
    peaks0 = {"fp32": matmul_rate(torch.float32, threads), "bf16": matmul_rate(torch.bfloat16, threads)}
    print("matmul", peaks0, flush=True)

    model = paper_model(n_cells, n_assays)
    n_bins = 256 if a.quick else 1024
    inputs = make_inputs(n_cells, n_assays, n_tracks, 128, n_bins)  # K=128 targets
    scale_output(model, inputs[0], np.arange(n_tracks), *inputs[1:])
    res["accuracy"] = bench_accuracy(model, make_inputs(n_cells, n_assays, n_tracks, 64, 512, seed=1))
    print("accuracy", json.dumps(res["accuracy"]), flush=True)
    res["predict"] = bench_predict(model, inputs, thread_counts=(1, threads) if threads > 1 else (1,))
    print("predict", json.dumps(res["predict"]), flush=True)

    work = tempfile.mkdtemp(prefix="edice-bench-impute-")
    try:
        res["layout"] = bench_layout(work, chunk_bins=4096 if a.quick else 16384)
        print("layout", json.dumps(res["layout"]), flush=True)
        if not a.skip_ray:
            import ray

            ray.init(address="local", num_cpus=threads, include_dashboard=False,
                     object_store_memory=200 * 2**20, log_to_driver=True)
            cells = [f"cell{i:02d}" for i in range(n_cells)]
            assays = [f"assay{j:02d}" for j in range(n_assays)]
            x, tc, ta, kc, ka = make_inputs(n_cells, n_assays, n_tracks, n_targets, 8)
            chunk = 4096 if a.quick else 16384
            sizes = [(2, 2 * chunk), (8, 2 * chunk)]  # 4 and 16 chunks of the same size
            res["end_to_end"] = bench_end_to_end(
                work, model, cells, assays, list(zip(tc, ta, strict=True)),
                list(zip(kc, ka, strict=True)), sizes, chunk, pools=(None, 1))
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    peaks1 = {"fp32": matmul_rate(torch.float32, threads), "bf16": matmul_rate(torch.bfloat16, threads)}
    res["matmul_flops"] = {"start": peaks0, "end": peaks1}
    print("matmul", peaks1, flush=True)

    # Projection: 2,000 tracks over hg38 with the full Roadmap vocabulary queried.
    cfg = model.cfg
    full = EDICE(ModelConfig(n_cells=127, n_assays=24))
    per_tb = P.flops_per_bin(full, TRACKS, 127, 24) / TRACKS
    best = max(res["predict"], key=lambda r: r["target_bins_per_s"])
    e2e = max((r["target_bins_per_s"] for r in res.get("end_to_end", [])), default=None)
    res["projection"] = {
        "flop_per_target_bin": per_tb,
        "decoder_macs_per_target_bin": decoder_macs(cfg),
        "cpu_target_bins_per_s_predict": best["target_bins_per_s"],
        "cpu_hours_predict": TRACKS * HG38_BINS / best["target_bins_per_s"] / 3600,
        "cpu_target_bins_per_s_end_to_end": e2e,
        "cpu_hours_end_to_end": TRACKS * HG38_BINS / e2e / 3600 if e2e else None,
        "h100_hours_at_half_of_989_tflops": TRACKS * HG38_BINS * per_tb / (0.5 * 989e12) / 3600,
    }
    print("projection", json.dumps(res["projection"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
