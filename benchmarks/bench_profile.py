"""Where the time of a training epoch and of an imputation goes (issue 13, item 2).

    python benchmarks/bench_profile.py --store STORE [--steps 60] [--context none] \\
        [--threads 2] [--json OUT.json] [--neighbours-ab ROUNDS]

On one of our track stores (for example ``bench_vs_reference.py``'s consortium), at
that benchmark's settings (embed_dim 64, 4 heads, ffn 128, decoder 2 x 512, 30 targets per
bin, batch 256), in this process, with the worker's own code paths:

1. **Training, by phase**: ``--steps`` steps of :class:`edice_dist.sampler.TrainSampler`
   batches through the model under :func:`edice_dist.trainloop.autocast_for`, Adam as the
   worker builds it; wall time per phase (the sampler's next batch, forward, backward,
   optimizer step), timed step by step after a warm-up.
2. **Training, by operator**: the same steps under ``torch.profiler``; the operators with
   the most self CPU time.
3. **Imputation, by phase**: :func:`edice_dist.predict.predict_chunk` over store chunks
   (read with :func:`edice_dist.context.read_window`, as the imputation actors read
   them), split into the read and the compute.

With ``--neighbours-ab``, only the sampler: seconds per batch of an epoch of ``--steps``
batches without (A) and with (B) each target's adjacent bins (``peak_by=neighbours``),
A and B interleaved for ROUNDS rounds, medians.

Phases are measured with ``time.perf_counter`` around each call, so their sum is the wall
time of the loop; the profiler's table adds its own overhead and is read for shares only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SETTINGS = {"embed_dim": 64, "n_heads": 4, "ffn_dim": 128, "decoder_hidden": 512,
            "decoder_layers": 2, "n_targets": 30, "batch_size": 256, "seed": 0}


def _setup(store_path: str, context: str):
    from edice_dist.store import open_store
    from edice_dist.trackplan import plan_tracks, vocab_index
    from edice_dist.trainconfig import load_config

    st = open_store(store_path)
    over = {k: str(v) for k, v in SETTINGS.items()}
    if context:
        over["context"] = context
    cfg = load_config(overrides=over)
    plan = plan_tracks(st, cfg)
    tc, ta = vocab_index(st, st.cell_keys, st.assays)
    return st, cfg, plan, np.asarray(tc), np.asarray(ta)


def profile_training(store_path: str, context: str, steps: int, warmup: int = 5) -> dict:
    """Wall seconds per phase over ``steps`` training steps, and the profiler's top ops."""
    from edice_dist.model import EDICE, init_seed
    from edice_dist.sampler import TrainSampler
    from edice_dist.trainloop import autocast_for

    st, cfg, plan, tc, ta = _setup(store_path, context)
    inputs = np.asarray(plan.inputs)
    device = torch.device("cpu")
    init_seed(cfg.seed)
    net = EDICE(cfg.model_config(st.cell_keys, len(st.assays)))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=1e-7, fused=True)
    in_cells, in_assays = torch.from_numpy(tc[inputs]), torch.from_numpy(ta[inputs])
    sampler = TrainSampler(st, inputs, plan.n_targets, cfg.batch_size, cfg.seed,
                           bins_per_epoch=(steps * 2 + warmup) * cfg.batch_size,
                           context=cfg.context)
    batches = sampler.batches(1)
    phases = {"sampler": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(timed: bool) -> None:
        t0 = time.perf_counter()
        b = next(batches)
        t1 = time.perf_counter()
        with autocast_for(device, cfg.precision):
            pred = net(b.x, b.support, in_cells, in_assays, in_cells[b.target],
                       in_assays[b.target])
        loss = F.mse_loss(pred.float(), b.y)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if timed:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[k] += dt

    net.train()
    for _ in range(warmup):
        step(False)
    for _ in range(steps):
        step(True)
    total = sum(phases.values())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(False)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    op_total = sum(e.self_cpu_time_total for e in ops)
    return {
        "steps": steps, "bins_per_s": steps * cfg.batch_size / total,
        "phases_s": phases, "phases_share": {k: v / total for k, v in phases.items()},
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / op_total,
                     "calls": e.count} for e in ops[:12]],
        "context": list(cfg.context), "precision": cfg.precision,
    }


def sampler_ab(store_path: str, context: str, steps: int, rounds: int) -> dict:
    """Median seconds per batch of a :class:`~edice_dist.sampler.TrainSampler` epoch of
    ``steps`` batches, the buffer's reads included, without (A) and with (B) neighbours."""
    from edice_dist.sampler import TrainSampler

    st, cfg, plan, _, _ = _setup(store_path, context)
    times: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(rounds):
        for name in times:
            s = TrainSampler(st, np.asarray(plan.inputs), plan.n_targets, cfg.batch_size,
                             cfg.seed, bins_per_epoch=steps * cfg.batch_size,
                             context=cfg.context, neighbours=name == "B")
            t = time.perf_counter()
            n = sum(1 for _ in s.batches(1))
            times[name].append((time.perf_counter() - t) / n)
    return {"tracks": len(plan.inputs), "context": list(cfg.context), "rounds": times,
            **{f"median_{k}_s": float(np.median(v)) for k, v in times.items()}}


def profile_imputation(store_path: str, context: str, model_dir: str | None) -> dict:
    """Read and compute seconds of ``predict_chunk`` over the store's chunks (an untrained
    model of the same shape when no ``model_dir``)."""
    from edice_dist import checkpoint, predict
    from edice_dist.context import read_window
    from edice_dist.model import EDICE, init_seed

    st, cfg, plan, tc, ta = _setup(store_path, context)
    if model_dir:
        model, _ = checkpoint.load_model(model_dir, "cpu")
    else:
        init_seed(cfg.seed)
        model = EDICE(cfg.model_config(st.cell_keys, len(st.assays)))
    cols = np.asarray(plan.inputs)
    qc = np.arange(len(st.cell_keys)).repeat(len(st.assays))
    qa = np.tile(np.arange(len(st.assays)), len(st.cell_keys))
    pred = predict.prepare(model, "cpu", None)
    read_s = compute_s = 0.0
    target_bins = 0
    for chunk in st.chunks():
        t0 = time.perf_counter()
        x = read_window(st, chunk.chrom, chunk.start, chunk.stop, cols, tuple(model.cfg.context))
        t1 = time.perf_counter()
        predict.predict_chunk(pred, x, np.arange(len(cols)), tc[cols], ta[cols], qc, qa)
        t2 = time.perf_counter()
        read_s, compute_s = read_s + t1 - t0, compute_s + t2 - t1
        target_bins += len(qc) * (chunk.stop - chunk.start)
    total = read_s + compute_s
    return {"dtype": str(pred.dtype).replace("torch.", ""), "targets": len(qc),
            "read_s": read_s, "compute_s": compute_s, "read_share": read_s / total,
            "target_bins_per_s": target_bins / total}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--context", default=None, help="e.g. none (the paper's model)")
    p.add_argument("--model", default=None, help="a trained model for the imputation part")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--neighbours-ab", type=int, default=0, metavar="ROUNDS",
                   help="time the sampler alone without and with neighbours")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch threads {torch.get_num_threads()}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    if a.neighbours_ab:
        r = sampler_ab(a.store, a.context, a.steps, a.neighbours_ab)
        print(f"sampler, {r['tracks']} training tracks, context {r['context']}, "
              f"{a.steps} batches per epoch: A (plain) {r['median_A_s'] * 1e3:.1f} ms/batch, "
              f"B (neighbours) {r['median_B_s'] * 1e3:.1f} ms/batch "
              f"(B/A {r['median_B_s'] / r['median_A_s']:.2f}); rounds A "
              f"{[round(v * 1e3, 1) for v in r['rounds']['A']]}, B "
              f"{[round(v * 1e3, 1) for v in r['rounds']['B']]}")
        return
    tr = profile_training(a.store, a.context, a.steps)
    print(f"\ntraining: {tr['bins_per_s']:,.0f} bins/s over {tr['steps']} steps "
          f"(context {tr['context']}, precision {tr['precision']})")
    print("| phase | share of the step |\n|---|---:|")
    for k, v in tr["phases_share"].items():
        print(f"| {k} | {v:.1%} |")
    print("\n| operator (self CPU) | share | calls |\n|---|---:|---:|")
    for o in tr["top_ops"]:
        print(f"| `{o['op']}` | {o['share']:.1%} | {o['calls']} |")
    im = profile_imputation(a.store, a.context, a.model)
    print(f"\nimputation ({im['dtype']}, {im['targets']} targets): "
          f"{im['target_bins_per_s']:,.0f} target-bins/s; read {im['read_share']:.1%} of "
          f"the time, compute {1 - im['read_share']:.1%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"training": tr, "imputation": im,
                       "loadavg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
