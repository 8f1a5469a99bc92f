"""Training and prediction speed side by side with the authors' eDICE (issue 13, item 1).

    python benchmarks/bench_vs_reference.py [--sim DIR] [--workdir DIR] \\
        [--reference /path/to/eDICE --reference-python /path/to/refenv/bin/python] \\
        [--threads N] [--variants paper default] [--json OUT.json]

Same data, same settings, one run after another on this machine:

- the data: a simulated consortium of 20 cell types x 10 assays, 116 observed tracks and 28
  held-out ones, 120,000 bins (made with ``edice simulate`` and ``edice ingest`` into
  ``--sim`` when it is not there yet; :data:`SIM_ARGS`);
- the settings: embed_dim 64, 4 heads, ffn 128, decoder 2 x 512, 30 targets per bin, batch
  256, one epoch of all bins, seed 0 (:data:`SETTINGS`). Both train on the same 110 tracks:
  our training holds a seeded 5 % of the 116 out for validation, and the reference gets
  exactly the remaining columns (``tracks="plan"``);
- ours: ``edice_dist.train.train`` (Ray Train on a local Ray, as ``edice train`` runs) in a
  child process; the epoch's bins/s from the model folder's ``history.tsv``; CPU summed
  over the child's whole process tree (driver, Ray daemons and Ray Train worker, sampled
  from /proc) over the epoch's training window; start-up from the launch of the child to
  the start of the epoch. Then prediction, compute only (the matrix in memory, the model
  prepared, one warm-up call): ``edice_dist.predict.predict_chunk`` over the store's chunks
  in float32 and in the default dtype (bf16 on CPUs with native bf16);
- the reference (with ``--reference``): ``benchmarks/reference.py``'s ``run_reference``:
  the authors' model, generator and ``model.fit`` (TensorFlow's default threads unless
  ``--threads``), the epoch's bins/s and CPU from inside their process, start-up from the
  launch to the first training batch, prediction with ``model.predict`` over batches of 256
  bins built like their ``ValInMemGenerator`` (compute only, after a warm-up).

Our models (:data:`VARIANTS`): ``paper`` (``context=none``: the reference's arithmetic
exactly, the side-by-side rows), ``paper_fp32`` (the same trained in float32 throughout)
and ``default`` (what new runs train: local-context channels), each trained, timed and
predicted as above. Every prediction (ours in float32 and in the default
dtype, the reference's) is scored on the 28 held-out tracks against the truth bigWigs
(MSE and GWcorr in arcsinh space, clipped at 0 as exported): the accuracy side of a
faster path.

The table gives ratios ours / reference (> 1: ours is faster). The machine's load average
is printed at the start and the end: the box is shared, and ratios from a loaded box mean
little.

How the epoch window of our run is found: ``train_loop`` times its epoch (``bins_per_s``
over the training steps, ``seconds`` with validation) and writes ``history.tsv`` right
after its checkpoint report; the parent polls for that file (every 0.1 s), so the epoch
started ``seconds`` before the file appeared, up to the report's duration (well under a
second here), and its training part lasted ``bins / bins_per_s``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import reference as ref  # noqa: E402

SIM_SEED = 9
SIM_ARGS = ["--n_cell_types=20", "--n_test=28", "--other_fraction=0.55",
            "--genome_bp=2999950",
            "--assays=H3K4me3,H3K27ac,H3K4me1,H3K36me3,H3K27me3,H3K9me3,DNase,H3K9ac,"
            "H3K79me2,H4K20me1"]
"""With ``--seed 9``: 20 cell types x 10 assays, 144 measured pairs of which 28 are held out
(116 observed), 3 chromosomes of 120,000 bins in all."""

SETTINGS = {"embed_dim": 64, "n_heads": 4, "ffn_dim": 128, "decoder_hidden": 512,
            "decoder_layers": 2, "n_targets": 30, "batch_size": 256, "epochs": 1,
            "refit": False}
"""The refit (a second run on every track) is off: one epoch against one epoch."""

PAPER = {"context": "none", "same_assay": "none", "peak_weight": 0.0, "average_decay": 0.0,
         "avg_blend": False}
VARIANTS = {"paper": PAPER, "paper_fp32": {**PAPER, "precision": "float32"}, "default": {}}
"""``paper``: the reference's arithmetic exactly (the side-by-side rows), trained as by
default (``precision=auto``: the decoder's products in bf16 on CPUs that have it);
``paper_fp32``: the same in float32 throughout (the accuracy cost of the bf16 products);
``default``: the model new runs get (local-context channels, the same-assay skip, the
peak term of the loss and the moving average of the weights)."""


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _edice(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edice_dist", *args], check=True,
                   cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def ensure_consortium(sim: str) -> str:
    """Simulate and ingest the benchmark's consortium into ``sim`` unless it is there;
    return the store's path."""
    store = os.path.join(sim, "store")
    if not os.path.exists(os.path.join(sim, "manifest.tsv")):
        _edice("simulate", sim, "--seed", str(SIM_SEED), *SIM_ARGS)
    if not os.path.exists(os.path.join(store, "zarr.json")):
        _edice("ingest", os.path.join(sim, "manifest.tsv"), "--chrom-sizes",
               os.path.join(sim, "chrom.sizes"), "--out", store)
    return store


# -- ours: training in a child process --------------------------------------------------------

def _child_train(store: str, out: str, overrides: str) -> None:
    """In the child: train as ``edice train`` does and print timestamps as JSON."""
    t_start = time.time()
    from edice_dist.train import train
    from edice_dist.trainconfig import load_config

    t_imported = time.time()
    cfg = load_config(overrides=json.loads(overrides))
    res = train(store, out, cfg)
    print("BENCH_RESULT " + json.dumps({"t_start": t_start, "t_imported": t_imported,
                                         "t_end": time.time(), "result": res}), flush=True)


def _history(out: str) -> list[dict]:
    with open(os.path.join(out, "history.tsv")) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def run_ours_training(store: str, out: str, settings: dict, log: str) -> dict:
    """Our training through ``edice_dist.train.train`` in a child process; see the module
    docstring for what is measured and how."""
    from edice_dist.sampler import TrainSampler
    from edice_dist.store import open_store
    from edice_dist.train import plan_tracks
    from edice_dist.trainconfig import load_config

    shutil.rmtree(out, ignore_errors=True)
    overrides = {k: str(v) for k, v in settings.items()}
    st = open_store(store)
    cfg = load_config(overrides=overrides)
    plan = plan_tracks(st, cfg)
    steps = TrainSampler(st, plan.inputs, plan.n_targets, cfg.batch_size, cfg.seed).steps(1)
    cmd = [sys.executable, os.path.abspath(__file__), "--child-train", store, out,
           json.dumps(overrides)]
    hist = os.path.join(out, "history.tsv")
    t_launch = time.time()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lf, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
        sampler = ref.TreeCPU(proc.pid, every=0.25)
        sampler.start()
        t_hist = None
        while proc.poll() is None:
            if t_hist is None and os.path.exists(hist):
                t_hist = time.time()
            time.sleep(0.1)
        stdout = proc.stdout.read()
        cpu_total = sampler.stop()
    wall = time.time() - t_launch
    if proc.returncode != 0:
        raise RuntimeError(f"our training failed (exit {proc.returncode}); see {log}")
    child = json.loads(next(ln for ln in stdout.splitlines()
                            if ln.startswith("BENCH_RESULT "))[len("BENCH_RESULT "):])
    rows = _history(out)
    epochs = []
    t_prev = t_hist
    for i, row in enumerate(rows):
        bins = steps * cfg.batch_size
        bps = float(row["bins_per_s"])
        train_s = bins / bps
        e = {"epoch": int(row["epoch"]), "bins": bins, "bins_per_s": bps, "train_s": train_s,
             "seconds_with_validation": float(row["seconds"]), "train_loss": float(row["train_loss"]),
             "val_mse": float(row["val_mse"])}
        if i == 0 and t_prev is not None:
            t0 = t_prev - float(row["seconds"])
            e["t_begin"] = t0
            e["cpu_s"] = sampler.cpu_between(t0, t0 + train_s)
            e["bins_per_cpu_s"] = bins / max(e["cpu_s"], 1e-9)
        epochs.append(e)
    first = epochs[0].get("t_begin")
    return {
        "epochs": epochs,
        "n_input_tracks": len(plan.inputs), "n_targets_per_bin": plan.n_targets,
        "startup_to_first_step_s": (first - t_launch) if first else None,
        "interpreter_and_imports_s": child["t_imported"] - t_launch,
        "wall_s": wall, "cpu_s": cpu_total,
        "fixed_cost_s": wall - sum(e["seconds_with_validation"] for e in epochs),
        "log": log,
    }


# -- ours: prediction, compute only -----------------------------------------------------------

def run_ours_prediction(model_dir: str, export: dict, chunk_bins: int, dtype) -> dict:
    """target-bins/s of ``predict_chunk`` over the exported matrix, in store-chunk-sized
    calls, as :mod:`edice_dist.impute` drives it (no reads, no writes)."""
    import torch

    from edice_dist import checkpoint, predict

    model, _ = checkpoint.load_model(model_dir, "cpu")
    z = np.load(export["path"])
    x = _with_context(z["x"], export["chrom_bins"], tuple(model.cfg.context))
    tc, ta = z["cell_ids"], z["assay_ids"]
    qc, qa = z["target_cell_ids"], z["target_assay_ids"]
    sup = np.arange(x.shape[1])
    pred = predict.prepare(model, "cpu", dtype)

    def run(lo: int, hi: int) -> np.ndarray:
        return predict.predict_chunk(pred, x[lo:hi], sup, tc, ta, qc, qa)

    t = time.perf_counter()
    run(0, min(2048, len(x)))  # warm-up
    warm = time.perf_counter() - t
    t, c = time.perf_counter(), _cpu_self()
    out = [run(lo, min(lo + chunk_bins, len(x))) for lo in range(0, len(x), chunk_bins)]
    dt, dc = time.perf_counter() - t, _cpu_self() - c
    tb = len(qc) * len(x)
    return {"dtype": str(pred.dtype).replace("torch.", ""), "seconds": dt, "cpu_s": dc,
            "target_bins": tb, "target_bins_per_s": tb / dt,
            "target_bins_per_cpu_s": tb / max(dc, 1e-9), "warmup_s": warm,
            "threads": torch.get_num_threads(), "n_parameters": model.n_parameters(),
            "predictions": np.concatenate(out, axis=1)}


def _with_context(x: np.ndarray, chrom_bins: list[int], context: tuple[int, ...]) -> np.ndarray:
    """``x`` (n_bins, T) with the model's context channels, chromosome by chromosome (the
    windows are cut at chromosome ends, as ``edice impute`` cuts them)."""
    from edice_dist.context import window_means

    if not context:
        return x
    parts, lo = [], 0
    for n in chrom_bins:
        parts.append(window_means(x[lo:lo + n], context, 0, 0))
        lo += n
    return np.concatenate(parts)


def held_out_scores(sim: str, store: str, preds: dict[str, np.ndarray]) -> dict:
    """MSE and GWcorr over the held-out tracks of each (K, n_bins) prediction, against
    the truth bigWigs read with pyBigWig (clipped at 0, as exported bigWigs are)."""
    from edice_dist.store import open_store

    genome = open_store(store).genome
    truth = np.stack([ref.read_truth_bins(p, genome) for _, _, p in ref.truth_targets(sim)])
    out = {}
    for name, p in preds.items():
        s = ref.score_tracks(p, truth)
        out[name] = {"mse": s["mse"], "gwcorr": s["gwcorr"]}
    return out


# -- the table --------------------------------------------------------------------------------

def _fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def table(ours: dict, refr: dict | None, scores: dict | None = None) -> str:
    """One row per figure; ``ours`` a variant's figures, ``scores`` the held-out MSE of
    its predictions (``f32``, ``default``) and the reference's (``reference``)."""
    e = ours["train"]["epochs"][0]
    rows = [
        ("training, the epoch itself: bins/s", e["bins_per_s"], None, 0),
        ("training: bins per CPU-second (process tree)", e.get("bins_per_cpu_s"), None, 0),
        ("prediction, compute only, float32: target-bins/s",
         ours["predict_f32"]["target_bins_per_s"], None, 0),
        (f"prediction, compute only, default ({ours['predict_default']['dtype']}): "
         "target-bins/s", ours["predict_default"]["target_bins_per_s"], None, 0),
        ("start-up to first training step: s", ours["train"]["startup_to_first_step_s"], None, 1),
        ("whole training run: wall s", ours["train"]["wall_s"], None, 1),
        ("whole training run: CPU s (process tree)", ours["train"]["cpu_s"], None, 1),
    ]
    if refr is not None:
        t = refr["timings"]
        re = t["epochs"][0]
        ref_vals = [re["bins_per_s"], re["bins_per_cpu_s"], t["predict"]["target_bins_per_s"],
                    t["predict"]["target_bins_per_s"], t["startup_to_first_step_s"],
                    t["t_train_end"] - t["t_launch"], t["cpu_train_end_s"]]
        rows = [(name, o, r, d) for (name, o, _, d), r in zip(rows, ref_vals, strict=True)]
    lines = ["| phase | the authors' eDICE (TF 2.15.1, fp32) | edice-dist | ours / reference |",
             "|---|---:|---:|---:|"]
    for i, (name, o, r, d) in enumerate(rows):
        ratio = "-"
        if o is not None and r:
            # Rates: ours / reference; times (seconds): reference / ours, so > 1 is ours faster.
            ratio = f"{(o / r) if i < 4 else (r / o):.2f}x"
        lines.append(f"| {name} | {_fmt(r, d)} | {_fmt(o, d)} | {ratio} |")
    if scores:
        r = scores.get("reference")
        ref_cell = f"{r['mse']:.4f} / {r['gwcorr']:.3f}" if r else "-"
        for key, label in (("f32", "float32"), ("default", ours["predict_default"]["dtype"])):
            o = scores[key]
            ratio = f"{o['mse'] / r['mse']:.3f} (MSE ours / reference)" if r else "-"
            lines.append(f"| held-out MSE / GWcorr, {label} predictions | {ref_cell} | "
                         f"{o['mse']:.4f} / {o['gwcorr']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-train":
        _child_train(*argv[1:4])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim", default="/tmp/edice-bench-vsref/sim",
                   help="consortium folder; simulated and ingested when missing")
    p.add_argument("--workdir", default="/tmp/edice-bench-vsref/work")
    p.add_argument("--reference", default=None, help="checkout of alex-hh/eDICE")
    p.add_argument("--reference-python", default=None, help="python with tensorflow 2.15")
    p.add_argument("--threads", type=int, default=None,
                   help="TensorFlow intra/inter-op threads (default: TensorFlow's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="our models to time (default: both)")
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)
    if bool(args.reference) != bool(args.reference_python):
        p.error("--reference and --reference-python go together")

    from edice_dist.store import open_store

    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} CPUs)", flush=True)
    store = ensure_consortium(args.sim)
    st = open_store(store)
    os.makedirs(args.workdir, exist_ok=True)
    settings = {**SETTINGS, "seed": args.seed}
    targets = [(c, a) for c, a, _ in ref.truth_targets(args.sim)]
    rsettings = ref.ReferenceSettings(**{k: v for k, v in settings.items() if k != "refit"},
                                      tracks="plan", threads=args.threads)
    export = ref.export_tracks(store, targets, args.workdir, rsettings)
    export["chrom_bins"] = [st.genome.n_bins(c) for c in st.genome.chroms]
    print(f"data: {export['n_bins']:,} bins, {len(export['columns'])} input tracks, "
          f"{len(targets)} targets; settings {settings}", flush=True)

    runs, preds = {}, {}
    for v in args.variants:
        vs = {**settings, **VARIANTS[v]}
        model_dir = os.path.join(args.workdir, f"ours-{v}")
        ours = {"settings": vs,
                "train": run_ours_training(store, model_dir, vs,
                                           os.path.join(args.workdir, f"ours-{v}-train.log"))}
        e = ours["train"]["epochs"][0]
        print(f"ours ({v}): epoch {e['bins_per_s']:,.0f} bins/s, "
              f"{_fmt(e.get('bins_per_cpu_s'))} bins per CPU-s", flush=True)
        ours["predict_f32"] = run_ours_prediction(model_dir, export, st.chunk_bins, "float32")
        ours["predict_default"] = run_ours_prediction(model_dir, export, st.chunk_bins, None)
        for k, short in (("predict_f32", "f32"), ("predict_default", "default")):
            preds[f"{v}:{short}"] = ours[k].pop("predictions")
            print(f"ours ({v}): prediction {ours[k]['dtype']} "
                  f"{ours[k]['target_bins_per_s']:,.0f} target-bins/s", flush=True)
        runs[v] = ours

    refr = None
    if args.reference:
        refr = ref.run_reference(args.reference, args.reference_python, store, targets,
                                 rsettings, os.path.join(args.workdir, "reference"))
        preds["reference"] = refr["predictions"]
        t = refr["timings"]
        print(f"reference: epoch {t['epochs'][0]['bins_per_s']:,.0f} bins/s, prediction "
              f"{t['predict']['target_bins_per_s']:,.0f} target-bins/s; "
              f"{t['n_parameters']:,} parameters", flush=True)

    load_end = os.getloadavg()
    scores = held_out_scores(args.sim, store, preds)
    for v, ours in runs.items():
        print(f"\n{v} ({ours['predict_f32']['n_parameters']:,} parameters; settings "
              f"{ours['settings']}):\n")
        sc = {"f32": scores[f"{v}:f32"], "default": scores[f"{v}:default"],
              "reference": scores.get("reference")}
        print(table(ours, refr, sc))
        ours["held_out"] = sc
    print()
    if refr is None:
        print("(no --reference: our figures only)")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)}; "
          f"at end: {' '.join(f'{v:.2f}' for v in load_end)} ({os.cpu_count()} CPUs)")
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
               "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": load_end,
               "settings": settings, "sim_seed": SIM_SEED, "sim_args": SIM_ARGS,
               "export": {k: v for k, v in export.items() if k != "targets"},
               "ours": runs,
               "reference": None if refr is None else {
                   "timings": refr["timings"], "settings": refr["settings"],
                   "held_out": scores.get("reference")}}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    main()
