"""Side by side with the authors' eDICE: run their TensorFlow code on our track stores.

The reference (``alex-hh/eDICE``) runs unmodified on ``tensorflow-cpu==2.15.1``, which needs
numpy < 2, so it lives in its own environment; nothing of it is part of this repository.
The user gives a checkout (``reference_dir``) and that environment's interpreter
(``python``). This module

1. exports, from one of our track stores, the dense matrix of the training tracks
   (n_bins x T, arcsinh, float32) with each column's cell and assay index and the targets
   to predict (:func:`export_tracks`);
2. runs ``benchmarks/_reference_driver.py`` with the reference's Python: their model, their
   training generator, their fit, then predictions of the targets at every bin from every
   exported track (:func:`run_reference`, :func:`reference_predictions`);
3. scores predictions against a simulated consortium's truth bigWigs, with the AVG
   baseline beside them (:func:`score_tracks`, :func:`avg_predictions`,
   :func:`read_truth_bins`), and measures the CPU of a process tree (:class:`TreeCPU`).

Run as a script it trains the reference on a consortium and prints its held-out MSE and
genome-wide Pearson next to AVG's::

    python benchmarks/reference.py --sim SIM_DIR --store STORE \\
        --reference /path/to/eDICE --reference-python /path/to/refenv/bin/python \\
        --embed_dim=64 --decoder_hidden=512 --n_targets=30 --epochs=3 --seed=1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from edice_dist.store import TrackStore, open_store  # noqa: E402

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_reference_driver.py")
INPUT_NPZ = "reference_input.npz"


@dataclass
class ReferenceSettings:
    """Settings of a reference run, named as our training config keys (SPEC section 6).

    The driver maps them to the reference's names: ``n_heads`` -> ``n_attn_heads``,
    ``ffn_dim`` -> ``intermediate_fc_dim``, ``attn_dropout`` -> ``transformer_dropout``.

    Attributes
    ----------
    tracks : str
        Which store columns the reference trains on and predicts from: ``"train"`` (every
        track of the ``train`` split: what the authors' script does, as it keeps the last
        epoch and needs no validation tracks) or ``"plan"`` (the input columns of our own
        training, :func:`edice_dist.train.plan_tracks`, after its seeded 5 % validation
        hold-out, for runs that must see exactly what ours sees).
    threads : int or None
        TensorFlow's intra- and inter-op threads; None leaves TensorFlow's defaults (all
        cores), as a user of the reference gets.
    bins_per_epoch : int or None
        Bins per epoch (``steps_per_epoch = bins_per_epoch // batch_size``); all bins when
        None.
    predict_batch : int
        Bins per prediction batch (their ``ValInMemGenerator`` default, 256).
    """

    embed_dim: int = 256
    n_heads: int = 4
    ffn_dim: int = 128
    decoder_hidden: int = 2048
    decoder_layers: int = 2
    decoder_dropout: float = 0.3
    attn_dropout: float = 0.1
    n_targets: int = 120
    batch_size: int = 256
    lr: float = 3e-4
    epochs: int = 1
    bins_per_epoch: int | None = None
    seed: int = 0
    threads: int | None = None
    predict_batch: int = 256
    tracks: str = "train"

    @classmethod
    def from_any(cls, settings: ReferenceSettings | dict | None) -> ReferenceSettings:
        """Settings from a dataclass, a dict (unknown keys are an error) or None."""
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown reference setting(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(names))}")
        return cls(**settings)

    def __post_init__(self):
        if self.tracks not in ("train", "plan"):
            raise ValueError(f"tracks must be 'train' or 'plan', got {self.tracks!r}")


# -- targets -----------------------------------------------------------------------------------

def parse_target(t) -> tuple[str, str]:
    """A (cell_key, assay) pair from a pair or a ``cell:assay`` string."""
    if isinstance(t, str):
        if t.count(":") != 1:
            raise ValueError(f"target {t!r} is not of the form cell:assay")
        c, a = t.split(":")
        return c.strip(), a.strip()
    c, a = t
    return str(c), str(a)


def truth_targets(sim_dir: str) -> list[tuple[str, str, str]]:
    """The held-out tracks of a simulated consortium: (cell_key, assay, truth bigWig path)
    per row of ``SIM_DIR/truth/targets.tsv``, in file order."""
    path = os.path.join(sim_dir, "truth", "targets.tsv")
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = []
    for r in rows:
        cell = r["cell_type"] + (f"@{r['individual']}" if r.get("individual") else "")
        p = r["path"] if os.path.isabs(r["path"]) else os.path.join(sim_dir, "truth", r["path"])
        out.append((cell, r["assay"], p))
    return out


# -- export ------------------------------------------------------------------------------------

def training_columns(st: TrackStore, settings: ReferenceSettings) -> tuple[list[int], int]:
    """(store columns, targets per bin) of a reference run; see ``ReferenceSettings.tracks``."""
    if settings.tracks == "plan":
        from edice_dist.train import plan_tracks
        from edice_dist.trainconfig import load_config

        cfg = load_config(overrides={"seed": str(settings.seed),
                                     "n_targets": str(settings.n_targets)})
        plan = plan_tracks(st, cfg)
        return list(plan.inputs), plan.n_targets
    cols = [int(i) for i in st.split_indices("train")]
    if len(cols) < 2:
        raise ValueError(f"store {st.path} has {len(cols)} training track(s); at least 2 needed")
    # Their generator would silently use every track as a target (and none as support) when
    # n_targets >= T; keep one support.
    return cols, min(settings.n_targets, len(cols) - 1)


def read_matrix(st: TrackStore, columns) -> np.ndarray:
    """Dense (n_bins, len(columns)) float32 values of ``columns`` over the whole genome,
    chromosomes in the store's order, read one store chunk at a time as the training
    sampler reads them (whole chunks, then the columns)."""
    columns = np.asarray(columns, dtype=np.int64)
    out = np.empty((st.genome.total_bins, len(columns)), dtype=np.float32)
    off = 0
    for ch in st.chunks():
        block = np.asarray(st.array(ch.chrom)[ch.start:ch.stop])[:, columns]
        out[off:off + ch.n_bins] = block
        off += ch.n_bins
    return out


def export_tracks(store_path: str, targets, workdir: str,
                  settings: ReferenceSettings | dict | None = None) -> dict:
    """Write the reference's input to ``workdir/reference_input.npz``.

    Parameters
    ----------
    store_path : str
        One of our track stores (``edice ingest``).
    targets : list of (cell_key, assay) pairs or ``cell:assay`` strings
        What to predict; any pair of the store's vocabulary (observed or not).
    workdir : str
        Created when missing.
    settings : ReferenceSettings or dict, optional
        Only ``tracks``, ``seed`` and ``n_targets`` matter here.

    Returns
    -------
    dict
        ``path`` (the npz), ``columns`` (store columns exported, in order), ``track_ids``,
        ``n_targets`` (targets per training bin), ``targets`` (pairs), ``n_bins``.

    The npz holds ``x`` (n_bins, T) float32 arcsinh values, ``cell_ids``, ``assay_ids``
    (T,) int64 indices into the store's ``cell_keys`` / ``assays`` (the same vocabulary our
    models use), ``target_cell_ids``, ``target_assay_ids`` (K,), ``n_cells``, ``n_assays``,
    ``columns`` and ``n_targets``.
    """
    settings = ReferenceSettings.from_any(settings)
    st = open_store(store_path)
    cols, k = training_columns(st, settings)
    cells = {c: i for i, c in enumerate(st.cell_keys)}
    assays = {a: i for i, a in enumerate(st.assays)}
    pairs = [parse_target(t) for t in targets]
    if not pairs:
        raise ValueError("no targets")
    bad = [f"{c}:{a}" for c, a in pairs if c not in cells or a not in assays]
    if bad:
        raise ValueError(f"targets outside the store's vocabulary: {', '.join(bad)}")
    x = read_matrix(st, cols)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, INPUT_NPZ)
    np.savez(
        path, x=x,
        cell_ids=np.array([cells[st.tracks[c].cell_key] for c in cols], np.int64),
        assay_ids=np.array([assays[st.tracks[c].assay] for c in cols], np.int64),
        target_cell_ids=np.array([cells[c] for c, _ in pairs], np.int64),
        target_assay_ids=np.array([assays[a] for _, a in pairs], np.int64),
        n_cells=np.int64(len(cells)), n_assays=np.int64(len(assays)),
        columns=np.array(cols, np.int64), n_targets=np.int64(k),
    )
    ids = st.track_ids()
    return {"path": path, "columns": cols, "track_ids": [ids[c] for c in cols],
            "n_targets": k, "targets": pairs, "n_bins": int(x.shape[0])}


# -- running the reference ---------------------------------------------------------------------

def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_reference(reference_dir: str, python: str, store_path: str, targets,
                  settings: ReferenceSettings | dict | None, workdir: str) -> dict:
    """Train the authors' model on a store's training tracks and predict ``targets``.

    Parameters
    ----------
    reference_dir : str
        A checkout of ``alex-hh/eDICE`` (the folder holding the ``edice`` package).
    python : str
        An interpreter with TensorFlow 2.15 (``tensorflow-cpu==2.15.1``), numpy < 2 and h5py.
    store_path : str
    targets : list of (cell_key, assay) or ``cell:assay``
    settings : ReferenceSettings or dict
        Model, training and prediction settings (see :class:`ReferenceSettings`).
    workdir : str
        Receives the exported matrix, the settings, the predictions, the timings and the
        driver's log (``reference.log``).

    Returns
    -------
    dict
        ``predictions`` (K, n_bins) float32, arcsinh space, unclipped; ``timings`` (the
        driver's, see ``_reference_driver.main``) with, added here: ``startup_to_first_step_s``
        (launch to the first training batch), ``startup_s_in_process`` (interpreter up to
        that batch), ``wall_s`` and ``cpu_s`` (the whole child process tree, from
        ``RUSAGE_CHILDREN``: the driver is waited for, and TensorFlow's pools are threads
        of it, so all its CPU is counted); ``export`` (see :func:`export_tracks`);
        ``settings``; ``log``.

    Raises
    ------
    RuntimeError
        When the driver fails (the message ends with the tail of its log).
    """
    settings = ReferenceSettings.from_any(settings)
    t_export = time.perf_counter()
    exp = export_tracks(store_path, targets, workdir, settings)
    export_s = time.perf_counter() - t_export
    run = {**asdict(settings), "n_targets": exp["n_targets"]}
    spath = os.path.join(workdir, "reference_settings.json")
    with open(spath, "w") as f:
        json.dump(run, f, indent=1)
    out = os.path.join(workdir, "reference_predictions.npz")
    tpath = os.path.join(workdir, "reference_timings.json")
    log = os.path.join(workdir, "reference.log")
    for p in (out, tpath):
        if os.path.exists(p):
            os.remove(p)
    env = dict(os.environ)
    # Only the reference on the path: our own environment's packages (numpy 2) must not
    # leak into the reference's interpreter.
    env["PYTHONPATH"] = os.path.abspath(reference_dir)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    cmd = [python, DRIVER, "--reference", os.path.abspath(reference_dir), "--input", exp["path"],
           "--settings", spath, "--out", out, "--timings", tpath]
    c0 = _children_cpu()
    t0 = time.time()
    with open(log, "w") as lf:
        rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env,
                            cwd=workdir).returncode
    wall = time.time() - t0
    cpu = _children_cpu() - c0
    if rc != 0 or not os.path.exists(out):
        with open(log) as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"the reference driver failed (exit {rc}); log {log}:\n{tail}")
    with open(tpath) as f:
        tm = json.load(f)
    tm["t_launch"] = t0
    tm["wall_s"] = wall
    tm["cpu_s"] = cpu
    tm["export_s"] = export_s
    tm["startup_to_first_step_s"] = tm["t_first_step_begin"] - t0
    tm["startup_s_in_process"] = tm["t_first_step_begin"] - tm["t_start"]
    tm["interpreter_start_s"] = tm["t_start"] - t0
    with np.load(out) as z:
        preds = np.array(z["predictions"], dtype=np.float32)
    return {"predictions": preds, "timings": tm, "export": exp, "settings": run, "log": log}


def reference_predictions(reference_dir: str, python: str, store_path: str, targets,
                          settings: ReferenceSettings | dict | None, workdir: str) -> np.ndarray:
    """The reference's predictions of ``targets`` for scoring: (K, n_bins) float32 in
    arcsinh space, unclipped (clip below 0 to score them as exported bigWigs are).

    Same parameters as :func:`run_reference`; ``settings`` default to ``tracks="train"``
    (every training-split track, as the authors' script trains and predicts)."""
    return run_reference(reference_dir, python, store_path, targets, settings,
                         workdir)["predictions"]


# -- scoring -----------------------------------------------------------------------------------

def read_truth_bins(path: str, genome) -> np.ndarray:
    """A truth bigWig as arcsinh of its 25 bp bin means, genome order, float32.

    Read with pyBigWig base by base (missing bases count as 0, SPEC section 3); a
    chromosome's last, partial bin is the mean over the bases it has.
    """
    import pyBigWig

    bs = genome.bin_size
    parts = []
    bw = pyBigWig.open(path)
    try:
        have = bw.chroms()
        for chrom, size in zip(genome.chroms, genome.sizes, strict=True):
            nb = genome.n_bins(chrom)
            if chrom not in have:
                parts.append(np.zeros(nb, np.float32))
                continue
            v = np.nan_to_num(np.asarray(bw.values(chrom, 0, size, numpy=True), np.float64))
            sums = np.add.reduceat(v, np.arange(0, size, bs))
            lens = np.minimum(np.arange(0, size, bs) + bs, size) - np.arange(0, size, bs)
            parts.append(np.arcsinh(sums / lens).astype(np.float32))
    finally:
        bw.close()
    return np.concatenate(parts)


def avg_predictions(st: TrackStore, targets) -> np.ndarray:
    """AVG (SPEC section 4): per target, the mean of the same assay over the training
    tracks of the other cell types, (K, n_bins) float32 (0 where no other cell has it)."""
    pairs = [parse_target(t) for t in targets]
    train = [int(i) for i in st.split_indices("train")]
    x = read_matrix(st, train)
    out = np.zeros((len(pairs), x.shape[0]), np.float32)
    for k, (c, a) in enumerate(pairs):
        cols = [j for j, col in enumerate(train)
                if st.tracks[col].assay == a and st.tracks[col].cell_key != c]
        if cols:
            out[k] = x[:, cols].astype(np.float64).mean(axis=1)
    return out


def score_tracks(pred: np.ndarray, truth: np.ndarray, clip: bool = True) -> dict:
    """Per-track MSE and genome-wide Pearson in arcsinh space, and their means.

    Parameters
    ----------
    pred, truth : (K, n_bins)
    clip : bool
        Clip predictions below 0 to 0 first, as exported bigWigs are.

    Returns
    -------
    dict
        ``mse``, ``gwcorr`` (means over tracks) and ``per_track`` lists of both.
    """
    p = np.asarray(pred, np.float64)
    t = np.asarray(truth, np.float64)
    if clip:
        p = np.maximum(p, 0.0)
    mse = ((p - t) ** 2).mean(axis=1)
    pc, tc = p - p.mean(axis=1, keepdims=True), t - t.mean(axis=1, keepdims=True)
    denom = np.sqrt((pc * pc).sum(axis=1) * (tc * tc).sum(axis=1))
    r = np.where(denom > 0, (pc * tc).sum(axis=1) / np.where(denom > 0, denom, 1), np.nan)
    return {"mse": float(mse.mean()), "gwcorr": float(np.nanmean(r)),
            "per_track": {"mse": mse.tolist(), "gwcorr": r.tolist()}}


# -- CPU of a process tree ---------------------------------------------------------------------

def _proc_table() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants now alive (from /proc)."""
    kids, out, todo = _proc_table(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of one process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields_ = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


class TreeCPU(threading.Thread):
    """Samples the CPU seconds of a process tree (e.g. a driver and its Ray workers, which
    are grandchildren through the raylet) every ``every`` seconds.

    Each process keeps its last seen value after it exits, so a tree whose workers come and
    go is summed correctly up to one sampling interval per exited process. ``samples`` is a
    list of (wall time, summed CPU seconds) for :meth:`cpu_between`.
    """

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.last: dict[int, float] = {}
        self.samples: list[tuple[float, float]] = []
        self._stop_evt = threading.Event()

    def sample(self) -> float:
        for p in tree_pids(self.pid):
            c = proc_cpu(p)
            if c is not None:
                self.last[p] = max(self.last.get(p, 0.0), c)
        total = sum(self.last.values())
        self.samples.append((time.time(), total))
        return total

    def run(self):
        while not self._stop_evt.is_set():
            self.sample()
            self._stop_evt.wait(self.every)

    def stop(self) -> float:
        """Stop sampling; the total CPU seconds of the tree as last seen."""
        self._stop_evt.set()
        self.join()
        return self.sample()

    def cpu_at(self, t: float) -> float:
        """Summed CPU seconds at wall time ``t``, linearly interpolated between samples."""
        ts = np.array([s[0] for s in self.samples])
        cs = np.array([s[1] for s in self.samples])
        return float(np.interp(t, ts, cs))

    def cpu_between(self, t0: float, t1: float) -> float:
        return self.cpu_at(t1) - self.cpu_at(t0)


# -- command line: the reference's accuracy on a simulated consortium ---------------------------

def _settings_from_args(extra: list[str]) -> ReferenceSettings:
    types = {f.name: f.type for f in fields(ReferenceSettings)}
    values = {}
    for item in extra:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(f"settings are --KEY=VALUE, got {item!r}")
        k, v = item[2:].split("=", 1)
        k = k.replace("-", "_")
        if k not in types:
            raise SystemExit(f"unknown setting {k}; valid: {', '.join(types)}")
        kind = str(types[k])
        if v.lower() in ("none", "auto") and "None" in kind:
            values[k] = None
        elif kind.startswith("int"):
            values[k] = int(float(v))
        elif kind.startswith("float"):
            values[k] = float(v)
        else:
            values[k] = v
    return ReferenceSettings(**values)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train the authors' eDICE on a simulated consortium and score its "
                    "held-out predictions (MSE, genome-wide Pearson, arcsinh space) next to AVG.",
        epilog="Other settings as --KEY=VALUE (ReferenceSettings: embed_dim, decoder_hidden, "
               "n_targets, epochs, seed, bins_per_epoch, threads, tracks, ...).")
    p.add_argument("--sim", required=True, help="consortium folder (edice simulate)")
    p.add_argument("--store", required=True, help="its track store (edice ingest)")
    p.add_argument("--reference", required=True, help="checkout of alex-hh/eDICE")
    p.add_argument("--reference-python", required=True, help="python with tensorflow 2.15")
    p.add_argument("--workdir", default=None, help="default: STORE.reference")
    p.add_argument("--json", default=None, help="write the scores here")
    args, extra = p.parse_known_args(argv)
    settings = _settings_from_args(extra)
    st = open_store(args.store)
    truth = truth_targets(args.sim)
    targets = [(c, a) for c, a, _ in truth]
    work = args.workdir or args.store.rstrip("/") + ".reference"
    print(f"load average at start: {os.getloadavg()}", flush=True)
    res = run_reference(args.reference, args.reference_python, args.store, targets, settings,
                        work)
    y = np.stack([read_truth_bins(path, st.genome) for _, _, path in truth])
    ref = score_tracks(res["predictions"], y)
    avg = score_tracks(avg_predictions(st, targets), y)
    tm = res["timings"]
    print(f"reference: {len(res['export']['columns'])} training tracks, "
          f"{res['export']['n_targets']} targets per bin, {len(targets)} held-out targets, "
          f"{res['export']['n_bins']:,} bins; {asdict(settings)}")
    for e in tm["epochs"]:
        print(f"  epoch {e['epoch']}: loss {e['loss']:.4f}, {e['bins_per_s']:,.0f} bins/s, "
              f"{e['seconds']:.1f} s")
    print(f"  wall {tm['wall_s']:.0f} s, CPU {tm['cpu_s']:.0f} s")
    print("| method | MSE | GWcorr |\n|---|---|---|")
    print(f"| reference eDICE (TF) | {ref['mse']:.3f} | {ref['gwcorr']:.3f} |")
    print(f"| AVG | {avg['mse']:.3f} | {avg['gwcorr']:.3f} |")
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": asdict(settings), "targets": [f"{c}:{a}" for c, a in targets],
                       "reference": ref, "avg": avg,
                       "timings": {k: v for k, v in tm.items() if k != "epochs"},
                       "epochs": tm["epochs"], "loadavg_end": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
