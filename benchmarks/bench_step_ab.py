"""Training-step cost of a model option: A against B, interleaved in one process.

    python benchmarks/bench_step_ab.py [--size paper|small] [--steps 15] \\
        [--a KEY=VALUE ...] [--b KEY=VALUE ...] [--threads 1] [--peak-weight W]
        [--peak-by A_RULE B_RULE] [--a-skip-kept] [--b-average DECAY]
        [--predict K [--bins N] [--a-batch-bins N] [--b-blend W]]

Both models train on the same Roadmap-shaped batch (127 cell types x 24 assays, 1,014
observed tracks, 120 targets per bin, 256 bins, with the default local-context channels)
with forward, backward and Adam; their steps alternate A, B, A, B, ... so that a shared
or noisy machine slows both alike, and the ratio of the medians is reported. ``paper``
is the paper's model size; ``small`` the accuracy benchmarks' (embed_dim 64, decoder
512, 30 targets). ``--peak-weight`` applies the peak-weighted loss to B (to both with
``--peak-by``, which gives each its ``peak_by`` rule), ``--b-average``
B's moving average of the weights (``average_decay``) after each of its steps;
``--b-blend`` gives B's imputation an AVG blend of weight W (``avg_blend``).
``--a``/``--b`` take model settings, ``context=4,20,100,500`` among them (each model
then gets as many input channels as its context asks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_train import BATCH, N_ASSAYS, N_CELLS, paper_batch  # noqa: E402

from edice_dist.config import convert  # noqa: E402
from edice_dist.model import EDICE, ModelConfig  # noqa: E402
from edice_dist.trainloop import WeightAverage, peak_level, training_loss  # noqa: E402

SIZES = {"paper": {}, "small": {"embed_dim": 64, "decoder_hidden": 512}}
TARGETS = {"paper": 120, "small": 30}
CONTEXT = (4, 20, 100)


def parse(kvs: list[str]) -> dict:
    out = {}
    for kv in kvs:
        k, v = kv.split("=", 1)
        out[k] = (convert(v, tuple[int, ...], k, "--a/--b") if k == "context"
                  else int(v) if v.isdigit() else v)
    return out


def channels(x: torch.Tensor, model: EDICE) -> torch.Tensor:
    """``x`` with the model's context channels (any values do for timing)."""
    return torch.stack([x * (1 - 0.1 * c) for c in range(model.cfg.n_channels)], dim=-1)


def make(size: str, over: dict):
    torch.manual_seed(0)
    model = EDICE(ModelConfig(N_CELLS, N_ASSAYS, **{"context": CONTEXT, **SIZES[size], **over}))
    return model.train(), torch.optim.Adam(model.parameters(), lr=3e-4)


def predict_ab(a) -> int:
    """Imputation (:func:`edice_dist.predict.predict_chunk`) of ``a.predict`` targets over
    ``a.bins`` bins with every observed track as a support, A and B interleaved."""
    from edice_dist.predict import predict_chunk, prepare

    x, _, tc, ta, _, _ = paper_batch()
    xr = x.repeat(-(-a.bins // BATCH), 1)[: a.bins]
    rng = np.random.default_rng(1)
    pairs = rng.choice(N_CELLS * N_ASSAYS, size=a.predict, replace=False)
    kc, ka = pairs // N_ASSAYS, pairs % N_ASSAYS
    models = {n: make(a.size, parse(kv))[0] for n, kv in (("A", a.a), ("B", a.b))}
    if a.b_blend:
        models["B"].set_blend((a.b_blend,) * N_ASSAYS)
    preds = {n: prepare(m) for n, m in models.items()}
    xcs = {n: channels(xr, m).numpy() for n, m in models.items()}
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(a.steps + 1):
        for n, p in preds.items():
            t = time.perf_counter()
            xc = xcs[n]
            predict_chunk(p, xc, np.arange(xc.shape[1]), tc.numpy(), ta.numpy(), kc, ka,
                          batch_bins=a.a_batch_bins if n == "A" else None)
            if i:
                times[n].append(time.perf_counter() - t)
    med = {n: float(np.median(v)) for n, v in times.items()}
    print(f"# bench_step_ab --predict: size {a.size}, {a.threads} thread(s), {a.steps} chunks "
          f"each of {xc.shape[0]} bins x {a.predict} targets, dtype {preds['A'].dtype}; "
          f"A {parse(a.a) or 'default'}"
          f"{f' in batches of {a.a_batch_bins} bins' if a.a_batch_bins else ''}, B {parse(a.b)}"
          f"{f' with an AVG blend of {a.b_blend}' if a.b_blend else ''}")
    for n in ("A", "B"):
        print(f"{n}: median chunk {med[n]:.2f} s, {xc.shape[0] * a.predict / med[n]:,.0f} "
              "target-bins/s")
    print(f"B / A time: {med['B'] / med['A']:.3f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--a", nargs="*", default=[])
    ap.add_argument("--b", nargs="*", default=["same_assay=attention"])
    ap.add_argument("--peak-weight", type=float, default=0.0)
    ap.add_argument("--peak-by", nargs=2, metavar=("A_RULE", "B_RULE"),
                    choices=("bin", "window", "both", "either", "neighbours"),
                    help="both models take the peak term, each with its rule")
    ap.add_argument("--predict", type=int, metavar="K", default=0,
                    help="time imputation instead: K targets over --bins bins per step")
    ap.add_argument("--bins", type=int, default=2048, help="bins per imputed chunk")
    ap.add_argument("--a-skip-kept", action="store_true",
                    help="A keeps the same-assay skip's training activations instead of "
                         "recomputing them in the backward pass")
    ap.add_argument("--b-average", type=float, metavar="DECAY", default=0.0,
                    help="B updates a moving average of its weights after every step")
    ap.add_argument("--b-blend", type=float, metavar="W", default=0.0,
                    help="with --predict: B's imputation blends AVG with weight W")
    ap.add_argument("--a-batch-bins", type=int, metavar="N",
                    help="with --predict: A imputes in batches of N bins (B: the default plan)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.predict:
        return predict_ab(a)
    x, support, tc, ta, target, y = paper_batch()
    k = TARGETS[a.size]
    target, y = target[:, :k], y[:, :k]
    support = torch.ones_like(support).scatter_(1, target, False)
    rules = dict(zip("AB", a.peak_by or ("bin", "bin"), strict=True))
    runs = {"A": (*make(a.size, parse(a.a)), a.peak_weight if a.peak_by else 0.0),
            "B": (*make(a.size, parse(a.b)), a.peak_weight)}
    if a.a_skip_kept:
        runs["A"][0].same_assay_skip.recompute = False
    xcs = {n: channels(x, r[0]) for n, r in runs.items()}
    averages = {"B": WeightAverage(runs["B"][0], a.b_average)} if a.b_average else {}
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(a.steps + 1):
        for name, (model, opt, pw) in runs.items():
            t = time.perf_counter()
            pred = model(xcs[name], support, tc, ta, tc[target], ta[target])
            # The rule's level, as the training loop takes it (SimpleNamespace: a Batch's
            # fields that peak_level reads; ``near``, another bin's values, costs what the
            # sampler's would).
            level = peak_level(SimpleNamespace(x=xcs[name], target=target, y=y,
                                               near=torch.roll(y, 1, 0)),
                               rules[name]) if pw else None
            loss = training_loss(pred.float(), y, pw, level)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if name in averages:
                averages[name].update()
            if i:  # the first step warms up
                times[name].append(time.perf_counter() - t)
    med = {n: float(np.median(v)) for n, v in times.items()}
    print(f"# bench_step_ab: size {a.size}, {a.threads} thread(s), {a.steps} steps each, "
          f"{BATCH} bins x {k} targets; A {parse(a.a) or 'default'}, B {parse(a.b)}"
          + (f", peak_weight {a.peak_weight}" if a.peak_weight else "")
          + (f", peak_by A {rules['A']}, B {rules['B']}" if a.peak_by else "")
          + (", A keeps the skip's activations" if a.a_skip_kept else "")
          + (f", B averages its weights ({a.b_average})" if a.b_average else ""))
    for n in ("A", "B"):
        print(f"{n}: median step {med[n] * 1e3:.1f} ms, {BATCH / med[n]:.0f} bins/s, "
              f"{runs[n][0].n_parameters():,} parameters")
    print(f"B / A step time: {med['B'] / med['A']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
