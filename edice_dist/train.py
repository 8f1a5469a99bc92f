"""Training eDICE on a track store with Ray Train, and fine-tuning a trained model.

The driver (:func:`train`, :func:`finetune`) checks the inputs and the model folder, then
starts a Ray Train ``TorchTrainer``; every worker runs :func:`train_loop`, reads its own
share of the store (:mod:`edice_dist.sampler`), trains a DDP replica and reports one
checkpoint per epoch. At the end the driver writes the checkpoint with the best
validation loss as ``model.pt`` (SPEC 2.5).

The model folder::

    MODEL_DIR/
      model.pt, model.json   the model to use (best validation MSE), written last
      history.tsv            one line per epoch
      train.json             the run's config, data and status ("running" / "finished")
      ray/run-NNN/epoch_EEEE/  per-epoch checkpoints (state.pt, metrics.json) of each
                             invocation; Ray Train keeps the best and the latest per run

Re-running the same command resumes an unfinished run from its latest checkpoint, and
says so when the run has finished; ``--resume`` with a larger ``epochs`` trains a finished
run further (the patience count starts again there). A different config in the same folder
is refused. When a worker dies, Ray Train restarts the workers (up to ``max_failures``
times) and they continue from the newest checkpoint of the run.

Reproducibility: model initialisation, the chunk order, the bin shuffle, the targets and
dropout are all seeded from (seed, epoch, worker rank), and every epoch starts from its
checkpointed state. On CPU the same config and seed therefore give bit-identical models,
with one worker and with several gloo workers (measured for two), whether the run went
straight through, was resumed, or recovered from a killed worker. Different worker counts
shard the data differently and give different models. On GPUs, bf16 autocast and
non-deterministic CUDA kernels make runs close but not bit-identical.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, storage
from ._configfile import parse_mapping
from .errors import EdiceError, InputError
from .model import EDICE, ModelConfig, extend_vocab, init_seed
from .progress import log
from .sampler import (
    TrainSampler,
    avg_weights,
    effective_n_targets,
    read_validation,
    validation_plan,
)
from .store import TrackStore, open_store

RECORD = "train.json"
HISTORY = "history.tsv"
STATE = "state.pt"
METRICS = "metrics.json"
FAIL_MARKER = "_fail_once"

ARCH_KEYS = ("embed_dim", "n_heads", "ffn_dim", "decoder_hidden", "decoder_layers",
             "decoder_dropout", "attn_dropout")
# Keys that may change when a run is resumed: they do not change what was learnt so far.
RESUMABLE = frozenset({"epochs", "patience", "min_delta", "workers", "use_gpu",
                       "cpus_per_worker", "max_failures", "_fail_at_epoch"})
HISTORY_COLUMNS = ("epoch", "train_loss", "val_mse", "val_pearson", "avg_mse", "bins_per_s",
                   "seconds", "best")


@dataclass
class TrainConfig:
    """Every training setting (SPEC section 6); the defaults are the paper's.

    ``None`` means "decide from the data or the cluster" (shown as ``auto``).
    """

    embed_dim: int = 256
    n_heads: int = 4
    ffn_dim: int = 128
    decoder_hidden: int = 2048
    decoder_layers: int = 2
    decoder_dropout: float = 0.3
    attn_dropout: float = 0.1
    n_targets: int = 120  # targets per bin (paper: 120) ...
    max_target_fraction: float = 0.5  # ... but at most this share of the training tracks
    batch_size: int = 256  # bins per optimiser step over all workers
    lr: float = 3e-4
    epochs: int = 50
    bins_per_epoch: int | None = None  # all training bins when unset
    seed: int = 0
    workers: int | None = None  # auto: one per GPU, else 1
    use_gpu: bool | None = None  # auto: when Ray has GPUs
    cpus_per_worker: int | None = None  # auto: Ray's CPUs / workers (torch threads too)
    patience: int = 5  # stop after this many epochs without a better validation MSE
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    val_fraction: float = 0.05  # training tracks held out when the store has no val split
    val_bins: int = 20000  # fixed validation bins (all when the genome is smaller)
    max_failures: int = 3  # worker failures Ray Train recovers from (from the last checkpoint)
    shuffle_chunks: int = 4  # store chunks read and shuffled together per worker
    _fail_at_epoch: int | None = None  # test hook: one worker exits once at this epoch

    def validate(self) -> TrainConfig:
        """Raise InputError on an impossible value; return self."""
        positive = ["embed_dim", "n_heads", "ffn_dim", "decoder_hidden", "decoder_layers",
                    "n_targets", "batch_size", "epochs", "val_bins", "shuffle_chunks"]
        for k in positive:
            if getattr(self, k) < 1:
                raise InputError(f"Config key {k} must be a positive integer, got {getattr(self, k)}.")
        for k in ("bins_per_epoch", "workers", "cpus_per_worker"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise InputError(f"Config key {k} must be a positive integer or auto, got {v}.")
        for k in ("decoder_dropout", "attn_dropout"):
            if not 0 <= getattr(self, k) < 1:
                raise InputError(f"Config key {k} must be in [0, 1), got {getattr(self, k)}.")
        for k in ("max_target_fraction", "val_fraction"):
            if not 0 < getattr(self, k) < 1:
                raise InputError(f"Config key {k} must be in (0, 1), got {getattr(self, k)}.")
        if not self.lr > 0:
            raise InputError(f"Config key lr must be positive, got {self.lr}.")
        if self.patience < 1 or self.min_delta < 0 or self.max_failures < -1:
            raise InputError("Config keys: patience must be >= 1, min_delta >= 0, "
                             "max_failures >= -1 (-1: unlimited).")
        if self.embed_dim % self.n_heads:
            raise InputError(f"embed_dim ({self.embed_dim}) must be divisible by n_heads "
                             f"({self.n_heads}).")
        return self

    def to_dict(self, private: bool = False) -> dict:
        d = asdict(self)
        return d if private else {k: v for k, v in d.items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def model_config(self, n_cells: int, n_assays: int) -> ModelConfig:
        return ModelConfig(n_cells, n_assays, **{k: getattr(self, k) for k in ARCH_KEYS})


def config_keys() -> list[str]:
    """The public config keys, in order."""
    return [f.name for f in fields(TrainConfig) if not f.name.startswith("_")]


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def _coerce(key: str, value, where: str):
    """A config value from a file (typed) or the command line (a string)."""
    kind = _field_types()[key]
    optional = "None" in kind
    if isinstance(value, str):
        v = value.strip()
        if optional and v.lower() in ("", "none", "null", "auto"):
            return None
    elif value is None:
        if optional:
            return None
        raise InputError(f"{where}: {key} cannot be empty.")
    else:
        v = value
    try:
        if kind.startswith("bool"):
            if isinstance(v, bool):
                return v
            s = str(v).lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            if isinstance(v, bool):
                raise ValueError
            f = float(v)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if kind.startswith("float"):
            if isinstance(v, bool):
                raise ValueError
            return float(v)
    except (TypeError, ValueError):
        pass
    else:
        return v
    want = kind.split(" |")[0]
    raise InputError(f"{where}: {key} must be {'an' if want == 'int' else 'a'} {want}"
                     f"{' or auto' if optional else ''}, got {value!r}.")


def _read_config_file(path: str) -> dict:
    return parse_mapping(storage.read_input(path, "config file"), path)


def load_config(config_file: str | None = None, overrides: dict[str, str] | None = None,
                defaults: dict | None = None) -> TrainConfig:
    """The training config: ``defaults`` (the paper's), then ``config_file`` (JSON or YAML),
    then ``overrides`` (``--KEY=VALUE`` strings).

    Raises
    ------
    InputError
        On an unknown key (the message lists the valid ones) or a bad value.
    """
    valid = {f.name for f in fields(TrainConfig)}
    values: dict = dict(defaults or {})
    sources = []
    if config_file:
        sources.append((_read_config_file(config_file), f"config file {config_file}"))
    if overrides:
        sources.append((overrides, "command line"))
    for data, where in sources:
        for key, value in data.items():
            k = str(key).replace("-", "_")
            if k == "gpus":  # SPEC 6: `--gpus` (all GPUs) or `--gpus=N` (N GPU workers)
                values.update(_gpus(value, where))
                continue
            if k not in valid:
                raise InputError(
                    f"Unknown config key {key!r} ({where}). Valid keys: "
                    f"{', '.join(config_keys())} (and gpus: --gpus, or --gpus=N for N GPU "
                    "workers)."
                )
            values[k] = _coerce(k, value, where)
    return TrainConfig(**values).validate()


def _gpus(value, where: str) -> dict:
    s = str(value).strip().lower()
    if s in ("true", "yes", "on", "all", ""):
        return {"use_gpu": True}
    if s in ("false", "no", "off", "0"):
        return {"use_gpu": False}
    n = _coerce("workers", value, where)
    return {"use_gpu": True, "workers": n}


def describe_config(cfg: TrainConfig) -> str:
    """``key=value, ...`` of every public key (``auto`` for None)."""
    return ", ".join(f"{k}={'auto' if v is None else v}" for k, v in cfg.to_dict().items())


# -- the data: which tracks train, which validate -------------------------------------------

@dataclass
class TrackPlan:
    """Store columns used by a run.

    Attributes
    ----------
    inputs : training tracks: supports and targets in training, supports in validation.
    val : validation targets (the ``val`` split, or a seeded share of the training tracks).
    val_source : "split" or "holdout".
    n_targets : targets per training bin after the cap.
    """

    inputs: list[int]
    val: list[int]
    val_source: str
    n_targets: int


def plan_tracks(st: TrackStore, cfg: TrainConfig) -> TrackPlan:
    """Training and validation columns of ``st`` (SPEC 2.5; test tracks are never used).

    Raises
    ------
    InputError
        No training tracks, or too few to hold some out and still mask.
    """
    train_cols = [int(i) for i in st.split_indices("train")]
    val_cols = [int(i) for i in st.split_indices("val")]
    if not train_cols:
        raise InputError(
            f"Store {st.path} has no training tracks (its {st.n_tracks} tracks are all "
            "val/test). Mark observed tracks with split 'train' in the manifest and re-ingest."
        )
    source = "split"
    if not val_cols:
        n_hold = max(1, int(round(cfg.val_fraction * len(train_cols))))
        if len(train_cols) - n_hold < 2:
            raise InputError(
                f"Store {st.path} has {len(train_cols)} training track(s) and no val split: "
                f"holding {n_hold} out for validation leaves too few to mask (at least 2 "
                "are needed: a support and a target). Add tracks, or mark some as split "
                "'val' in the manifest."
            )
        rng = np.random.default_rng([cfg.seed, 0x5EED])
        held = sorted(int(i) for i in rng.choice(train_cols, size=n_hold, replace=False))
        train_cols = [c for c in train_cols if c not in set(held)]
        val_cols, source = held, "holdout"
    if len(train_cols) < 2:
        raise InputError(
            f"Store {st.path} has {len(train_cols)} training track: too few to mask (training "
            "needs at least 2, one support and one target per bin). Add training tracks."
        )
    k = effective_n_targets(cfg.n_targets, len(train_cols), cfg.max_target_fraction)
    return TrackPlan(train_cols, val_cols, source, k)


def store_fingerprint(st: TrackStore) -> dict:
    """What identifies a store's data for a run (not its path: stores may move)."""
    return {
        "path": st.path,
        "tracks": [f"{t.track_id}:{t.split}" for t in st.tracks],
        "chroms": [[c["name"], c["n_bins"]] for c in st.attrs["chroms"]],
        "transform": st.transform,
        "bin_size": st.genome.bin_size,
    }


def _vocab_index(st: TrackStore, cells: list[str], assays: list[str]) -> tuple[list, list]:
    ci = {c: i for i, c in enumerate(cells)}
    ai = {a: i for i, a in enumerate(assays)}
    return [ci[t.cell_key] for t in st.tracks], [ai[t.assay] for t in st.tracks]


# -- the model folder ------------------------------------------------------------------------

def _read_record(out: str) -> dict | None:
    path = storage.join(out, RECORD)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is unreadable ({e}); train into a new --out folder.") from None


def _write_record(out: str, record: dict) -> None:
    storage.write_text_atomic(storage.join(out, RECORD), json.dumps(record, indent=2) + "\n")


def _diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two run records' config and data."""
    out = []
    oc, nc = old.get("config", {}), new.get("config", {})
    for k in sorted(set(oc) | set(nc)):
        if k not in RESUMABLE and oc.get(k) != nc.get(k):
            out.append(f"{k} {oc.get(k)!r} -> {nc.get(k)!r}")
    for k in ("kind", "parent_model"):
        if old.get(k) != new.get(k):
            out.append(f"{k} {old.get(k)!r} -> {new.get(k)!r}")
    os_, ns = old.get("store", {}), new.get("store", {})
    for k in ("tracks", "chroms", "transform", "bin_size"):
        if os_.get(k) != ns.get(k):
            out.append(f"store {k} differ" if k in ("tracks", "chroms")
                       else f"store {k} {os_.get(k)!r} -> {ns.get(k)!r}")
    return out


def _checkpoints(out: str) -> list[dict]:
    """Every epoch checkpoint in ``out/ray`` with its metrics, oldest first."""
    found = []
    root = storage.join(out, "ray")
    for run in storage.list_dir(root):
        if not run.startswith("run-"):
            continue
        for name in storage.list_dir(storage.join(root, run)):
            if not name.startswith("epoch_"):
                continue
            path = storage.join(root, run, name)
            try:
                metrics = json.loads(storage.read_text(storage.join(path, METRICS)))
            except (OSError, json.JSONDecodeError, FileNotFoundError):
                metrics = None
            found.append({"run": run, "name": name, "path": path, "metrics": metrics,
                          "epoch": int(name.split("_")[1])})
    found.sort(key=lambda c: (c["epoch"], c["run"]))
    return found


def _load_state(path: str) -> dict:
    """A checkpoint's ``state.pt``; InputError when it is unreadable or partial."""
    f = storage.join(path, STATE)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(f)), map_location="cpu", weights_only=True)
        for key in ("model", "optimizer", "epoch", "history", "config"):
            state[key]  # noqa: B018 - a missing key means a partial or foreign file
    except Exception as e:  # torch raises many types for truncated files
        raise InputError(
            f"Checkpoint {f} is unreadable or partial ({type(e).__name__}: {e}). Delete the "
            f"folder {path} to resume from the checkpoint before it, or train into a new "
            "--out folder."
        ) from None
    return state


def _latest(out: str) -> dict | None:
    """The newest complete checkpoint (None when there is none); InputError when the newest
    one is partial."""
    found = _checkpoints(out)
    cks = [c for c in found if c["metrics"] is not None]
    partial = [c for c in found if c["metrics"] is None]
    if partial and (not cks or partial[-1]["epoch"] > cks[-1]["epoch"]):
        c = partial[-1]
        raise InputError(
            f"Checkpoint {c['path']} is partial (no {METRICS}). Delete that folder to resume "
            "from the checkpoint before it, or train into a new --out folder."
        )
    return cks[-1] if cks else None


def _next_run_name(out: str) -> str:
    runs = [n for n in storage.list_dir(storage.join(out, "ray")) if n.startswith("run-")]
    nums = [int(n[4:]) for n in runs if n[4:].isdigit()]
    return f"run-{max(nums, default=0) + 1:03d}"


def _ray_storage(path: str) -> tuple[str, object]:
    """Ray Train's (storage_path, storage_filesystem) for a local path or a URL."""
    if not storage.is_url(path):
        return storage.filesystem(path)[1], None
    import pyarrow.fs

    fs, inner = storage.filesystem(path)
    return inner, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _write_history(out: str, history: list[dict]) -> None:
    lines = ["\t".join(HISTORY_COLUMNS)]
    for row in history:
        vals = []
        for k in HISTORY_COLUMNS:
            v = row.get(k, "")
            vals.append(f"{v:.6g}" if isinstance(v, float) else str(v))
        lines.append("\t".join(vals))
    storage.write_text_atomic(storage.join(out, HISTORY), "\n".join(lines) + "\n")


# -- drivers ----------------------------------------------------------------------------------

def train(store: str, out: str, cfg: TrainConfig, resume: bool = False) -> dict:
    """``edice train``: train eDICE on the training tracks of ``store`` into ``out``.

    Parameters
    ----------
    store : track store path or URL.
    out : model folder (path or URL).
    cfg : see :func:`load_config`.
    resume : train a finished run further (to ``cfg.epochs`` in total). An unfinished run
        with the same config is resumed whether or not this is set.

    Returns
    -------
    dict
        ``model_dir``, ``best_epoch``, ``best_val_mse``, ``epochs_run``, ``status``.
    """
    store, out = map(storage.absolute, (store, out))
    cfg.validate()
    st = open_store(store)
    plan = plan_tracks(st, cfg)
    cells, assays = st.cell_keys, st.assays
    record = {"kind": "train", "config": cfg.to_dict(), "store": store_fingerprint(st),
              "parent_model": None}
    loop = {"kind": "train", "base_model": None, "n_base_cells": 0, "n_base_assays": 0,
            "model_config": cfg.model_config(len(cells), len(assays)).to_dict()}
    return _run(st, out, cfg, plan, cells, assays, record, loop, resume)


FINETUNE_DEFAULTS = {"lr": 1e-4, "epochs": 10, "patience": 3}


def finetune(model_dir: str, store: str, out: str, config_file: str | None = None,
             overrides: dict[str, str] | None = None, resume: bool = False) -> dict:
    """``edice finetune`` (SPEC 2.7): adapt a trained model to the tracks of ``store``.

    The global embeddings and the attention blocks stay frozen; the signal embedders
    (W, b) and the decoder train (lr 1e-4, 10 epochs by default). Cell types or assays of
    ``store`` that the model lacks get new embedding rows that train (the old rows stay
    frozen) and zero input columns in the signal embedders, so the base model's
    predictions on its own vocabulary are unchanged at the start.

    Returns
    -------
    dict, as :func:`train`.
    """
    model_dir, store, out = map(storage.absolute, (model_dir, store, out))
    if storage.filesystem(out)[1].rstrip("/") == storage.filesystem(model_dir)[1].rstrip("/"):
        raise InputError(f"--out {out} is the base model's folder; write the fine-tuned model "
                         "to a new folder so that the base model stays as it is.")
    base, meta = checkpoint.load_model(model_dir, "cpu")
    base_cfg = meta["model_config"]
    arch = {k: base_cfg[k] for k in ARCH_KEYS}
    cfg = load_config(config_file, overrides, defaults={**FINETUNE_DEFAULTS, **arch})
    changed = [k for k in ARCH_KEYS if getattr(cfg, k) != arch[k]]
    if changed:
        raise InputError(
            f"Fine-tuning keeps the architecture of {model_dir}; drop the config key(s) "
            f"{', '.join(changed)} (the base model has "
            f"{', '.join(f'{k}={arch[k]}' for k in changed)})."
        )
    st = open_store(store)
    if st.transform != meta["transform"]:
        raise InputError(
            f"Store {store} holds {st.transform} values but model {model_dir} was trained on "
            f"{meta['transform']} values. Re-ingest the tracks with the model's transform."
        )
    base_bin = int(meta.get("store_fingerprint", {}).get("bin_size", st.genome.bin_size))
    if base_bin != st.genome.bin_size:
        raise InputError(f"Store {store} has {st.genome.bin_size} bp bins but model {model_dir} "
                         f"was trained on {base_bin} bp bins.")
    shared = sorted(set(st.assays) & set(meta["assays"]))
    if not shared:
        raise InputError(
            f"Store {store} shares no assay with model {model_dir} (store: "
            f"{', '.join(st.assays)}; model: {', '.join(meta['assays'])}). Fine-tuning "
            "transfers what the model knows about assays; train a new model instead."
        )
    cells = list(meta["cell_keys"]) + sorted(set(st.cell_keys) - set(meta["cell_keys"]))
    assays = list(meta["assays"]) + sorted(set(st.assays) - set(meta["assays"]))
    plan = plan_tracks(st, cfg)
    new_cfg = ModelConfig.from_dict({**base_cfg, "n_cells": len(cells), "n_assays": len(assays)})
    record = {"kind": "finetune", "config": cfg.to_dict(), "store": store_fingerprint(st),
              "parent_model": model_dir}
    loop = {"kind": "finetune", "base_model": model_dir, "n_base_cells": base.cfg.n_cells,
            "n_base_assays": base.cfg.n_assays, "model_config": new_cfg.to_dict()}
    new_c, new_a = len(cells) - base.cfg.n_cells, len(assays) - base.cfg.n_assays
    if new_c or new_a:
        log(f"fine-tuning adds {new_c} cell type(s) and {new_a} assay(s) to the vocabulary")
    return _run(st, out, cfg, plan, cells, assays, record, loop, resume)


def _run(st: TrackStore, out: str, cfg: TrainConfig, plan: TrackPlan, cells: list[str],
         assays: list[str], record: dict, loop: dict, resume: bool) -> dict:
    """The folder protocol, Ray Train and the final model, for train and finetune."""
    kind = record["kind"]
    old = _read_record(out)
    if old is None and storage.exists(storage.join(out, "model.pt")):
        raise InputError(f"{out} already holds a model that this command did not train "
                         "(no train.json). Use a new --out folder.")
    resume_from, patience_from, cont = None, 0, False
    latest = _latest(out) if old is not None else None
    if old is not None and latest is None and old.get("status") != "finished":
        old = None  # an earlier attempt that stopped before its first epoch: start afresh
    if old is not None:
        diff = _diff(old, record)
        finished = old.get("status") == "finished" and storage.exists(storage.join(out, "model.pt"))
        if diff:
            raise InputError(
                f"{out} holds a {'finished' if finished else 'unfinished'} {old.get('kind')} "
                f"run with a different config or data ({'; '.join(diff)}). Use a new --out "
                "folder (or restore the old settings to resume it; only "
                f"{', '.join(sorted(k for k in RESUMABLE if not k.startswith('_')))} may change)."
            )
        if finished:
            done_epochs = int(old.get("epochs_run", 0))
            if not resume or cfg.epochs <= int(old["config"]["epochs"]):
                log(f"{kind}: {out} is already trained with this config "
                    f"({done_epochs} epochs, best epoch {old.get('best_epoch')}, val MSE "
                    f"{old.get('best_val_mse')}); nothing to do. Use --resume with a larger "
                    "epochs to train it further, or a new --out folder.")
                return {"model_dir": out, "status": "done", "best_epoch": old.get("best_epoch"),
                        "best_val_mse": old.get("best_val_mse"), "epochs_run": done_epochs}
            cont = True
        if latest is not None:
            state = _load_state(latest["path"])  # fails early, on the driver, when partial
            resume_from = latest["path"]
            patience_from = int(state["epoch"]) if cont else int(old.get("patience_from", 0))
            log(f"{kind}: resuming {out} from epoch {state['epoch']} ({latest['path']})")
            del state
    elif resume:
        log(f"{kind}: nothing to resume in {out}; starting a new run")

    from . import raycluster

    raycluster.init()
    use_gpu, workers, cpus = _resources(cfg)
    # Fails here, not on every worker, when the genome is too small for the batches.
    TrainSampler(st, plan.inputs, plan.n_targets, cfg.batch_size // workers, cfg.seed, 0,
                 workers, cfg.bins_per_epoch, cfg.shuffle_chunks)
    record = {**record, "status": "running", "patience_from": patience_from,
              "updated": _now()}
    storage.makedirs(out)
    _write_record(out, record)
    run_name = _next_run_name(out)
    loop.update({
        "train_config": cfg.to_dict(private=True),
        "store": st.path, "out": out, "input_cols": plan.inputs, "val_cols": plan.val,
        "n_targets": plan.n_targets, "cell_keys": cells, "assays": assays,
        "transform": st.transform, "use_gpu": use_gpu, "threads": cpus,
        "resume_from": resume_from, "patience_from": patience_from, "run_name": run_name,
    })
    tc, ta = _vocab_index(st, cells, assays)
    loop["track_cells"], loop["track_assays"] = tc, ta
    log(f"{kind}: {len(plan.inputs)} training tracks, {len(plan.val)} validation tracks "
        f"({plan.val_source}), {plan.n_targets} targets per bin; {len(cells)} cell types x "
        f"{len(assays)} assays; {workers} worker(s) on {'GPU' if use_gpu else 'CPU'} "
        f"({cpus} CPU each); run {run_name}")
    log(f"{kind} config: {describe_config(cfg)}")
    result = _fit(loop, out, run_name, workers, use_gpu, cpus, cfg.max_failures)
    return _finalise(out, record, plan, st, cells, assays, loop, result)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _resources(cfg: TrainConfig) -> tuple[bool, int, int]:
    """(use_gpu, workers, CPUs per worker) from the config and what Ray reports.

    On a cluster that a job joined (``RAY_ADDRESS``), GPUs Ray does not report yet are
    not an error: an autoscaling cluster starts with no GPU node and adds them when the
    trainer asks. On the embedded local Ray they are.
    """
    from . import raycluster

    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    gpus = raycluster.gpu_count()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    workers = cfg.workers or (max(gpus, 1) if use_gpu else 1)
    if use_gpu and workers > gpus:
        if not on_cluster and gpus == 0:
            raise InputError("use_gpu is true but Ray reports no GPU. Drop --use_gpu (or set "
                             "it to false) to train on CPUs.")
        if not on_cluster:
            raise InputError(f"{workers} GPU workers need {workers} GPUs; Ray reports {gpus}. "
                             "Lower workers.")
        log(f"train: {workers} GPU worker(s) asked for, {gpus} GPU(s) up now; waiting for "
            "the autoscaler to add GPU nodes")
    cpus = cfg.cpus_per_worker or _default_cpus_per_worker(workers, use_gpu)
    cpus_total = raycluster.cpu_slots()
    if workers * cpus > cpus_total and not on_cluster:
        raise InputError(f"{workers} workers x {cpus} CPUs exceed the {cpus_total} CPUs Ray "
                         "has. Lower workers or cpus_per_worker.")
    if cfg.batch_size < workers:
        raise InputError(f"batch_size {cfg.batch_size} is smaller than the {workers} workers "
                         "it is split across.")
    return use_gpu, workers, cpus


def _default_cpus_per_worker(workers: int, use_gpu: bool) -> int:
    """CPUs that every worker can get on one node: for GPU workers, the CPUs per GPU of the
    smallest GPU node up now (1 while none is); for CPU workers, an even share of the
    cluster capped by the largest node."""
    import ray

    from . import raycluster

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if use_gpu:
        per_gpu = [int(r.get("CPU", 0) // r["GPU"]) for r in nodes if r.get("GPU", 0) >= 1]
        return max(1, min(per_gpu)) if per_gpu else 1
    largest = max((int(r.get("CPU", 0)) for r in nodes), default=1)
    return max(1, min(raycluster.cpu_slots() // workers, largest))


def _fit(loop: dict, out: str, run_name: str, workers: int, use_gpu: bool, cpus: int,
         max_failures: int):
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, fs = _ray_storage(storage.join(out, "ray"))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # Keep the most recent new best (score = its epoch) and the latest checkpoint.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="best_epoch",
                checkpoint_score_order="max"),
            # Ray Train's per-report INFO lines would drown the one line per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        return trainer.fit()
    except Exception as e:
        raise _training_error(e, out) from None


def _training_error(e: Exception, out: str) -> EdiceError:
    failures = getattr(e, "worker_failures", None) or {}
    for err in failures.values():
        # Ray wraps a worker's exception (RayTaskError subclasses it); find the original.
        cause, seen = err, 0
        while cause is not None and seen < 10:
            if isinstance(cause, EdiceError) and type(cause) in (EdiceError, InputError):
                return cause
            cause = getattr(cause, "cause", None) or cause.__cause__
            seen += 1
    first = next(iter(failures.values()), e)
    text = str(first).strip().splitlines()
    brief = text[-1] if text else type(first).__name__
    return EdiceError(
        f"Training failed ({type(e).__name__}: {brief}). The checkpoints so far are kept in "
        f"{storage.join(out, 'ray')}; run the same command again to resume from the latest."
    )


def _finalise(out: str, record: dict, plan: TrackPlan, st: TrackStore, cells, assays,
              loop: dict, result) -> dict:
    """Write the best checkpoint as model.pt (last), history.tsv and the finished record."""
    latest = _latest(out)
    if latest is None:
        raise EdiceError(f"Training in {out} reported no checkpoint; run the command again.")
    m = latest["metrics"]
    best_epoch = int(m["best_epoch"])
    if best_epoch == 0:
        raise EdiceError(
            f"Training in {out} never reached a finite validation MSE in {m['epoch']} epochs "
            "(it diverged). Lower lr and train into a new --out folder."
        )
    cands = [c for c in _checkpoints(out) if c["epoch"] == best_epoch and c["metrics"]]
    if not cands:
        raise EdiceError(f"The best checkpoint (epoch {best_epoch}) is missing from "
                         f"{storage.join(out, 'ray')}; run the command again with --resume.")
    best = _load_state(cands[-1]["path"])
    model = EDICE(ModelConfig.from_dict(best["config"]["model_config"]))
    model.load_state_dict(best["model"])
    history = m["history"]
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    ids = st.track_ids()
    info = {
        "cell_keys": cells,
        "assays": assays,
        "transform": st.transform,
        "kind": record["kind"],
        "train_config": record["config"],
        "n_targets": plan.n_targets,
        "store": st.path,
        "store_fingerprint": record["store"],
        "train_tracks": [ids[i] for i in plan.inputs],
        "val_tracks": [ids[i] for i in plan.val],
        "val_source": plan.val_source,
        "epoch": best_epoch,
        "epochs_run": int(m["epoch"]),
        "stopped_early": bool(m.get("stopped")),
        "best_val_mse": best_row["val_mse"],
        "best_val_pearson": best_row["val_pearson"],
        "val_avg_mse": best_row["avg_mse"],
        "history": history,
        "restores": m.get("restores", []),
        "trained": _now(),
    }
    if loop["base_model"]:
        info["parent_model"] = loop["base_model"]
        info["frozen"] = ["cell_embed.table (old rows)", "assay_embed.table (old rows)",
                          "cell_context", "assay_context"]
    _write_history(out, history)
    checkpoint.save_model(out, model, info)
    _write_record(out, {**record, "status": "finished", "epochs_run": int(m["epoch"]),
                        "best_epoch": best_epoch, "best_val_mse": best_row["val_mse"],
                        "updated": _now()})
    log(f"{record['kind']}: done after {m['epoch']} epochs; best epoch {best_epoch} (val MSE "
        f"{best_row['val_mse']:.4f}, Pearson {best_row['val_pearson']:.3f}; AVG baseline MSE "
        f"{best_row['avg_mse']:.4f}) saved as {storage.join(out, 'model.pt')}")
    return {"model_dir": out, "status": "trained", "best_epoch": best_epoch,
            "best_val_mse": best_row["val_mse"], "epochs_run": int(m["epoch"])}


# -- the worker --------------------------------------------------------------------------------

def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _initial_model(config: dict, state: dict | None) -> EDICE:
    """The model before DDP: from a checkpoint, from the base model (fine-tuning) or new."""
    mcfg = ModelConfig.from_dict(config["model_config"])
    if state is not None:
        model = EDICE(mcfg)
        model.load_state_dict(state["model"])
        return model
    if config["base_model"]:
        base, _ = checkpoint.load_model(config["base_model"], "cpu")
        return extend_vocab(base, mcfg.n_cells, mcfg.n_assays).train()
    init_seed(int(config["train_config"]["seed"]))
    return EDICE(mcfg)


def finetune_trainable(model: EDICE, n_base_cells: int, n_base_assays: int) -> dict:
    """Freeze what SPEC 2.7 freezes; return {parameter: number of leading frozen rows} for
    the embedding tables whose new rows train (their old rows get zero gradients)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in (model.cell_embed.linear, model.assay_embed.linear, model.decoder, model.output):
        for p in m.parameters():
            p.requires_grad_(True)
    masks = {}
    for table, n_old in ((model.cell_embed.table.weight, n_base_cells),
                         (model.assay_embed.table.weight, n_base_assays)):
        if table.shape[0] > n_old:
            table.requires_grad_(True)
            masks[table] = n_old
    return masks


def train_loop(config: dict) -> None:
    """One worker of a training run (Ray Train calls it on every worker).

    Reads this worker's share of the bins straight from the store, trains a DDP replica,
    validates on its share of the validation bins (metrics summed over workers) and reports
    one checkpoint per epoch (written by rank 0).
    """
    import ray.train
    import ray.train.torch

    _quiet_ray_train()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.from_dict(config["train_config"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    torch.set_num_threads(int(config["threads"]))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    st = open_store(config["store"])
    inputs = np.asarray(config["input_cols"], dtype=np.int64)
    val_cols = np.asarray(config["val_cols"], dtype=np.int64)
    tc = np.asarray(config["track_cells"], dtype=np.int64)
    ta = np.asarray(config["track_assays"], dtype=np.int64)
    in_cells = torch.from_numpy(tc[inputs]).to(device)
    in_assays = torch.from_numpy(ta[inputs]).to(device)
    val_cells = torch.from_numpy(tc[val_cols]).to(device)
    val_assays = torch.from_numpy(ta[val_cols]).to(device)

    state, why = _restore(config)

    net = _initial_model(config, state).to(device)
    masks = {}
    if config["kind"] == "finetune":
        masks = finetune_trainable(net, config["n_base_cells"], config["n_base_assays"])
    model = ray.train.torch.prepare_model(net)  # DDP when world > 1
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    history: list[dict] = []
    restores: list[dict] = []
    start, best_epoch, best_mse = 1, 0, math.inf
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        history = list(state["history"])
        restores = list(state.get("restores", [])) + [{"from_epoch": int(state["epoch"]),
                                                        "why": why}]
        start = int(state["epoch"]) + 1
        best_epoch, best_mse = int(state["best_epoch"]), float(state["best_val_mse"])
        if state.get("stopped") and int(state["epoch"]) > int(config["patience_from"]):
            return  # this run already stopped early; nothing left to do
    patience_from = int(config["patience_from"])

    sampler = TrainSampler(st, inputs, config["n_targets"], cfg.batch_size // world, cfg.seed,
                           rank, world, cfg.bins_per_epoch, cfg.shuffle_chunks)
    vplan = validation_plan(st, cfg.val_bins, cfg.seed)
    xv, yv = read_validation(st, vplan, inputs, val_cols, rank, world)
    w_avg = avg_weights(tc[inputs], ta[inputs], tc[val_cols], ta[val_cols])

    for epoch in range(start, cfg.epochs + 1):
        torch.manual_seed(_mix_seed(cfg.seed, epoch, rank))  # dropout
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for batch in sampler.batches(epoch):
            b = batch.to(device)
            with autocast_for(device):
                pred = model(b.x, b.support, in_cells, in_assays, in_cells[b.target],
                             in_assays[b.target])
            loss = F.mse_loss(pred.float(), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, n_old in masks.items():
                p.grad[:n_old] = 0
            opt.step()
            loss_sum += loss.detach()
            steps += 1
            if cfg._fail_at_epoch == epoch and rank == world - 1:
                _fail_once(config["out"], rank, epoch)
        train_s = time.perf_counter() - t0
        val = _validate(net, xv, yv, w_avg, in_cells, in_assays, val_cells, val_assays,
                        cfg.batch_size, device)
        agg = _all_reduce(torch.cat([val, torch.stack([loss_sum, torch.tensor(
            float(steps), dtype=torch.float64, device=device)])]))
        metrics = _val_metrics(agg[:8])
        metrics["train_loss"] = float(agg[8] / max(agg[9], 1))
        metrics["bins_per_s"] = steps * (cfg.batch_size // world) * world / max(train_s, 1e-9)
        metrics["seconds"] = time.perf_counter() - t0
        improved = metrics["val_mse"] < best_mse - cfg.min_delta
        if improved:
            best_epoch, best_mse = epoch, metrics["val_mse"]
        stale = epoch - max(best_epoch, patience_from)
        stopped = stale >= cfg.patience and epoch < cfg.epochs
        row = {"epoch": epoch, **{k: metrics[k] for k in HISTORY_COLUMNS[1:-1]},
               "best": int(improved)}
        history.append(row)
        report = {**row, "best_epoch": best_epoch if improved else 0, "stopped": int(stopped)}
        _report(config, rank, epoch, net, opt, history, restores, best_epoch, best_mse, stopped,
                report)
        if rank == 0:
            _worker_log(_epoch_line(config["kind"], epoch, cfg.epochs, metrics, improved))
            _write_history(config["out"], history)
        if stopped:
            if rank == 0:
                _worker_log(f"{config['kind']}: no better validation MSE for {stale} epochs "
                            f"(patience {cfg.patience}); stopping early, best epoch {best_epoch}")
            break


def _fail_once(out: str, rank: int, epoch: int) -> None:
    """Test hook: exit this worker's process abruptly, once per model folder."""
    marker = storage.join(out, FAIL_MARKER)
    if not storage.exists(marker):
        storage.write_text_atomic(marker, f"worker {rank} exited during epoch {epoch}\n")
        os._exit(1)


def _worker_log(msg: str) -> None:
    # Not print(): Ray Train's print patch would log the line twice.
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _quiet_ray_train() -> None:
    """Ray Train logs two INFO lines per report on every worker; the one line per epoch
    of :func:`train_loop` is the progress report. (Ray 2.60 names one of these loggers by
    its file path, so ``LoggingConfig`` does not reach it.)"""
    names = ["ray.train.v2._internal.execution.storage"]
    try:
        from ray.train.v2._internal.execution import context as _ctx

        names += [_ctx.__name__, _ctx.__file__]
    except ImportError:  # another Ray layout: leave its logging alone
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def _restore(config: dict) -> tuple[dict | None, str | None]:
    """The state to continue from: after a worker failure, the newest checkpoint of this
    run; otherwise the checkpoint the driver chose (``resume_from``), if any.

    Ray Train hands back the last checkpoint it registered; one reported just before the
    failure may not be registered yet, so the run's folder is looked at as well and the
    newer complete one wins.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    found = []
    if ckpt is not None:
        with ckpt.as_directory() as d:
            found.append(torch.load(os.path.join(d, STATE), map_location="cpu",
                                    weights_only=True))
    run_dir = storage.join(config["out"], "ray", config["run_name"])
    for c in reversed([c for c in _checkpoints(config["out"]) if c["run"] == config["run_name"]]):
        if found and c["epoch"] <= int(found[0]["epoch"]):
            break
        try:
            found.append(_load_state(c["path"]))
            break
        except InputError:  # cut short by the failure: use an older one
            continue
    if found:
        state = max(found, key=lambda s: int(s["epoch"]))
        _worker_log(f"{config['kind']}: restarted after a failure; continuing from epoch "
                    f"{state['epoch']} ({run_dir})")
        return state, "worker failure"
    if config["resume_from"]:
        return _load_state(config["resume_from"]), "resume"
    return None, None


def _validate(net: EDICE, xv: np.ndarray, yv: np.ndarray, w_avg: np.ndarray, in_cells,
              in_assays, val_cells, val_assays, batch: int, device) -> torch.Tensor:
    """Sums over this worker's validation bins (float64, on ``device``): n, sum p, sum y,
    sum p^2, sum y^2, sum p*y, squared error, AVG's squared error."""
    sums = torch.zeros(8, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        for i in range(0, len(xv), 4 * batch):
            x = torch.from_numpy(xv[i:i + 4 * batch]).to(device)
            y = torch.from_numpy(yv[i:i + 4 * batch]).double()
            support = torch.ones_like(x, dtype=torch.bool)
            with autocast_for(device):
                p = net(x, support, in_cells, in_assays, val_cells, val_assays)
            p = p.double().cpu()
            sums += torch.stack([torch.tensor(float(p.numel()), dtype=torch.float64), p.sum(),
                                 y.sum(), (p * p).sum(), (y * y).sum(), (p * y).sum(),
                                 ((p - y) ** 2).sum(), torch.zeros((), dtype=torch.float64)])
    if len(xv):
        avg = xv.astype(np.float64) @ w_avg.astype(np.float64)
        sums[7] = float(((avg - yv) ** 2).sum())
    net.train()
    return sums.to(device)


def _val_metrics(s: torch.Tensor) -> dict:
    n, sp, sy, spp, syy, spy, sse, sse_avg = (float(v) for v in s)
    n = max(n, 1.0)
    cov = n * spy - sp * sy
    var = (n * spp - sp * sp) * (n * syy - sy * sy)
    r = cov / math.sqrt(var) if var > 0 else float("nan")
    return {"val_mse": sse / n, "val_pearson": r, "avg_mse": sse_avg / n}


def _epoch_line(kind: str, epoch: int, epochs: int, m: dict, improved: bool) -> str:
    return (f"{kind} epoch {epoch}/{epochs}: loss {m['train_loss']:.4f}, val MSE "
            f"{m['val_mse']:.4f} (AVG {m['avg_mse']:.4f}), val Pearson {m['val_pearson']:.3f}, "
            f"{m['bins_per_s']:,.0f} bins/s, {m['seconds']:.1f} s{'  *best*' if improved else ''}")


def _report(config, rank, epoch, net, opt, history, restores, best_epoch, best_mse, stopped,
            metrics):
    """ray.train.report on every worker; rank 0 attaches the checkpoint."""
    import ray.train

    name = f"epoch_{epoch:04d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    state = {
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "history": history,
        "restores": restores,
        "best_epoch": best_epoch,
        "best_val_mse": best_mse,
        "stopped": bool(stopped),
        "config": {k: config[k] for k in ("train_config", "model_config", "kind", "base_model")},
        "cell_keys": config["cell_keys"],
        "assays": config["assays"],
        "transform": config["transform"],
    }
    with tempfile.TemporaryDirectory(prefix="edice-ckpt-") as tmp:
        torch.save(state, os.path.join(tmp, STATE))
        with open(os.path.join(tmp, METRICS), "w") as f:
            json.dump({"epoch": epoch, "best_epoch": best_epoch, "best_val_mse": best_mse,
                       "stopped": bool(stopped), "history": history, "restores": restores}, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)
