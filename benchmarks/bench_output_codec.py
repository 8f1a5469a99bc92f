"""Codecs of the imputed output store, measured at 2,000 targets.

    python benchmarks/bench_output_codec.py [--targets 2000] [--chunks 2] [--json OUT]

The output store (``RUN_DIR/imputed.zarr``) holds one (targets x bins) array per
chromosome in float16, sharded as the writers own it: shards of (targets, 16,384 bins),
inner chunks of (1, 16,384) so that the exporter reads one target without decoding the
others (BENCHMARKS.md, Imputation, output layout). This measures, for each candidate codec
of the inner chunks, on that exact layout:

- size: bytes per value on disk;
- write rate: values per second through ``array[:, a:b] = y`` of whole shards, which is
  what an imputation actor's writer thread does while the next chunk computes;
- read rates: one target of one shard (what each export task reads, chunk by chunk) and
  a whole shard.

Lossless codecs save little on float16 predictions: their 10 mantissa bits are noise to a
compressor. The rows marked ``round N`` first round each value to N mantissa bits (a
relative error of at most 2^-(N+1)), to show what a lossy output would gain; they also
report that error.

Values: no model is run. Predictions are smooth, mostly background, with peaks where the
observed tracks of the target's assay have them (they are conditional means), so each
stand-in target is the mean of three observed tracks of one assay of a simulated
consortium (``edice_dist.simulate``), from a random window, plus a little noise, in
arcsinh space, cast to float16 as the actors store them. Real predictions may compress
somewhat differently; the ranking of the codecs is what this is for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CHUNK = 16384


def codecs() -> dict[str, list]:
    from zarr.codecs import BloscCodec, ZstdCodec

    def blosc(cname, level, shuffle):
        return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=2)]

    return {
        "none": [],
        "blosc-lz4-shuffle": blosc("lz4", 5, "shuffle"),
        "blosc-lz4-bitshuffle": blosc("lz4", 5, "bitshuffle"),
        "blosc-zstd1-shuffle": blosc("zstd", 1, "shuffle"),
        "blosc-zstd1-bitshuffle": blosc("zstd", 1, "bitshuffle"),
        "blosc-zstd3-bitshuffle": blosc("zstd", 3, "bitshuffle"),
        "blosc-zstd5-bitshuffle": blosc("zstd", 5, "bitshuffle"),
        "zstd3": [ZstdCodec(level=3)],
    }


def stand_in_predictions(work: str, n_targets: int, n_bins: int, seed: int = 0) -> np.ndarray:
    """(n_targets, n_bins) float16 arcsinh values shaped like predictions (see above)."""
    from edice_dist.simulate import SimConfig, simulate
    from edice_dist.sources import open_source

    sim = os.path.join(work, "sim")
    cfg = SimConfig.from_overrides({"seed": "1", "chrom_sizes": f"chr1:{(n_bins * 4) * 25}",
                                    "zoom_levels": "0", "n_test": "0"})
    simulate(sim, cfg)
    import csv

    rows = list(csv.DictReader(open(os.path.join(sim, "manifest.tsv")), delimiter="\t"))
    by_assay: dict[str, list[np.ndarray]] = {}
    for r in rows:
        with open_source(os.path.join(sim, r["path"])) as s:
            v = np.arcsinh(s.binned("chr1", 0, n_bins * 4)).astype(np.float32)
        by_assay.setdefault(r["assay"], []).append(v)
    rng = np.random.default_rng(seed)
    assays = sorted(a for a, v in by_assay.items() if len(v) >= 3)
    out = np.empty((n_targets, n_bins), dtype=np.float16)
    for k in range(n_targets):
        tracks = by_assay[assays[k % len(assays)]]
        pick = rng.choice(len(tracks), 3, replace=False)
        at = int(rng.integers(0, 3 * n_bins))
        mean = sum(tracks[i][at:at + n_bins] for i in pick) / 3
        out[k] = np.maximum(mean + rng.normal(0, 0.02, n_bins), 0)
    return out


def round_mantissa(x: np.ndarray, keep: int) -> np.ndarray:
    """float16 ``x`` rounded to ``keep`` of its 10 mantissa bits (to nearest)."""
    drop = 10 - keep
    bits = x.view(np.uint16).astype(np.uint32)
    bits = (bits + (1 << (drop - 1))) & ~np.uint32((1 << drop) - 1)
    return bits.astype(np.uint16).view(np.float16)


def variants() -> list[tuple[str, list, int | None]]:
    out = [(name, comp, None) for name, comp in codecs().items()]
    for keep in (8, 7):
        for name in ("blosc-lz4-bitshuffle", "blosc-zstd3-bitshuffle"):
            out.append((f"{name}, round {keep}", codecs()[name], keep))
    return out


def bench(work: str, values: np.ndarray, n_chunks: int, rounds: int = 3) -> list[dict]:
    import zarr

    K = values.shape[0]
    rows = []
    exact = values
    for name, comp, keep in variants():
        values = exact if keep is None else round_mantissa(exact, keep)
        err = np.abs(values.astype(np.float32) - exact.astype(np.float32))
        best_w, best_r1, best_rs, size = 0.0, 0.0, 0.0, 0
        for _ in range(rounds):
            path = os.path.join(work, f"{name.replace(', ', '-').replace(' ', '')}.zarr")
            root = zarr.open_group(path, mode="w", zarr_format=3)
            arr = root.create_array("chr1", shape=(K, CHUNK * n_chunks), chunks=(1, CHUNK),
                                    shards=(K, CHUNK), dtype="float16", compressors=comp,
                                    fill_value=float("nan"))
            arr = arr.with_config({"write_empty_chunks": True})
            t = time.perf_counter()
            for c in range(n_chunks):
                arr[:, c * CHUNK:(c + 1) * CHUNK] = values
            best_w = max(best_w, K * CHUNK * n_chunks / (time.perf_counter() - t))
            size = sum(os.path.getsize(os.path.join(d, f))
                       for d, _, fs in os.walk(os.path.join(path, "chr1")) for f in fs
                       if f != "zarr.json")
            r = zarr.open_group(path, mode="r")["chr1"]
            t = time.perf_counter()
            for k in range(0, K, max(1, K // 50)):
                r[k, 0:CHUNK]
            n1 = len(range(0, K, max(1, K // 50)))
            best_r1 = max(best_r1, n1 / (time.perf_counter() - t))
            t = time.perf_counter()
            got = r[:, 0:CHUNK]
            best_rs = max(best_rs, K * CHUNK / (time.perf_counter() - t))
            assert np.array_equal(got, values)  # lossless
        rows.append({"codec": name, "bytes_per_value": size / (K * CHUNK * n_chunks),
                     "write_mvalues_s": best_w / 1e6, "read_one_target_ms": 1e3 / best_r1,
                     "read_shard_mvalues_s": best_rs / 1e6,
                     "max_abs_err": float(err.max()), "rms_err": float(np.sqrt((err ** 2).mean()))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=int, default=2000)
    ap.add_argument("--chunks", type=int, default=2, help="shards written per codec")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edice-codec-") as work:
        values = stand_in_predictions(work, a.targets, CHUNK)
        print(f"stand-in predictions: {values.shape}, mean {values.astype(np.float32).mean():.3f}, "
              f"zeros {np.mean(values == 0):.3f}", flush=True)
        rows = bench(work, values, a.chunks)
    res = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "targets": a.targets, "chunk_bins": CHUNK, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    # hg38 at 2,000 targets: 124 M bins x 2,000 values
    for r in rows:
        print(f"{r['codec']:<36} {r['bytes_per_value']:.3f} B/value -> "
              f"{r['bytes_per_value'] * 124e6 * a.targets / 1e9:,.0f} GB for hg38 x {a.targets}")


if __name__ == "__main__":
    main()
