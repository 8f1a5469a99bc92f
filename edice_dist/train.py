"""Training eDICE on a track store with Ray Train, and fine-tuning a trained model: the
driver.

The driver (:func:`train`, :func:`finetune`) checks the inputs and the model folder, then
starts a Ray Train ``TorchTrainer``; every worker runs
:func:`edice_dist.trainloop.train_loop` with the same typed
:class:`~edice_dist.trainloop.WorkerConfig` and reports one checkpoint per epoch. At the
end the driver writes the checkpoint with the best validation loss as ``model.pt``
(SPEC 2.5). The settings are :class:`edice_dist.trainconfig.TrainConfig`; the model
folder's layout is in :mod:`edice_dist.checkpoint`.

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

import dataclasses
import datetime as _dt
import functools
import os

import numpy as np

from . import _faults, blend, checkpoint, owned, storage
from .errors import EdiceError, InputError, explain
from .model import EDICE, ModelConfig
from .progress import log
from .sampler import TrainSampler
from .store import TrackStore, open_store
from .trackplan import (  # noqa: F401 - holdout_tracks: part of this module's interface
    TrackPlan,
    TrackSelection,
    holdout_tracks,
    like_rows,
    plan_tracks,
    selected_vocab,
    trained_vocab,
    vocab_index,
)
from .tracks import individuals_of
from .trainconfig import (
    ARCH_KEYS,
    LATER_KEYS,
    RESUMABLE,
    TrainConfig,
    describe_config,
    load_config,
)
from .trainloop import WorkerConfig, train_loop
from .trainsession import run_local

# -- the run record ---------------------------------------------------------------------------


def _diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two run records' config and data."""
    out = []
    oc, nc = {**LATER_KEYS, **old.get("config", {})}, {**LATER_KEYS, **new.get("config", {})}
    for k in sorted(set(oc) | set(nc)):
        if k not in RESUMABLE and oc.get(k) != nc.get(k):
            out.append(f"{k} {oc.get(k)!r} -> {nc.get(k)!r}")
    for k in ("kind", "parent_model", "selection"):
        if old.get(k) != new.get(k):
            out.append(f"{k} {old.get(k)!r} -> {new.get(k)!r}")
    os_, ns = old.get("store", {}), new.get("store", {})
    for k in ("tracks", "chroms", "transform", "bin_size"):
        if os_.get(k) != ns.get(k):
            out.append(f"store {k} differ" if k in ("tracks", "chroms")
                       else f"store {k} {os_.get(k)!r} -> {ns.get(k)!r}")
    return out


def _ray_storage(path: str) -> tuple[str, object]:
    """Ray Train's (storage_path, storage_filesystem) for a local path or a URL."""
    if not storage.is_url(path):
        return storage.filesystem(path)[1], None
    import pyarrow.fs

    fs, inner = storage.filesystem(path)
    return inner, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


# -- drivers ----------------------------------------------------------------------------------

def train(store: str, out: str, cfg: TrainConfig, resume: bool = False,
          tracks: TrackSelection | None = None, in_process: bool = False) -> dict:
    """``edice train``: train eDICE on the training tracks of ``store`` into ``out``.

    Parameters
    ----------
    store : track store path or URL.
    out : model folder (path or URL).
    cfg : see :func:`edice_dist.trainconfig.load_config`.
    resume : train a finished run further (to ``cfg.epochs`` in total). An unfinished run
        with the same config is resumed whether or not this is set.
    tracks : use only these tracks of the store; the vocabulary is then theirs
        (:func:`selected_vocab`).
    in_process : one worker in this process, never Ray Train (a workflow's Ray task that
        trains one of many models).

    Returns
    -------
    dict
        ``model_dir``, ``best_epoch``, ``best_val_mse``, ``epochs_run``, ``status``.
    """
    store, out = map(storage.absolute, (store, out))
    cfg.validate()
    st = open_store(store)
    plan = plan_tracks(st, cfg, tracks)
    cells, assays = (st.cell_keys, st.assays) if tracks is None else selected_vocab(st, plan)
    record = {"kind": "train", "config": cfg.to_dict(), "store": st.identity(),
              "parent_model": None}
    if tracks is not None:
        record["selection"] = tracks.to_dict()
    loop = {"kind": "train", "model": cfg.model_config(cells, len(assays))}
    return _select_then_refit(st, out, cfg, plan, cells, assays, record, loop, resume,
                              in_process)


FINETUNE_DEFAULTS = {"lr": 1e-4, "epochs": 10, "patience": 3}


def finetune(model_dir: str, store: str, out: str, config_file: str | None = None,
             overrides: dict[str, str] | None = None, resume: bool = False,
             tracks: TrackSelection | None = None, in_process: bool = False) -> dict:
    """``edice finetune`` (SPEC 2.7): adapt a trained model to the tracks of ``store``.

    The global embeddings and the attention blocks stay frozen; the signal embedders
    (W, b) and the decoder train (lr 1e-4, 10 epochs by default). Cell types or assays of
    ``store`` that the model lacks get new embedding rows that train (the old rows stay
    frozen) and zero input columns in the signal embedders, so the base model's
    predictions on its own vocabulary are unchanged at the start. A new row starts at the
    mean of the rows of the same cell type in other individuals (``liver@ind4`` from
    ``liver@ind1..3``) where the model has some, else at the mean of all rows.

    ``tracks`` and ``in_process`` are as for :func:`train`: with a selection whose
    ``targets`` are one individual's tracks, the model is fine-tuned on that individual
    while the other tracks are inputs only.

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
    # Typed (context as a tuple), and a key the base model predates takes its default.
    base_arch = ModelConfig.from_dict(base_cfg)
    arch = {k: getattr(base_arch, k) for k in ARCH_KEYS}
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
    plan = plan_tracks(st, cfg, tracks)
    st_cells, st_assays = (st.cell_keys, st.assays) if tracks is None else selected_vocab(st, plan)
    cells = list(meta["cell_keys"]) + sorted(set(st_cells) - set(meta["cell_keys"]))
    assays = list(meta["assays"]) + sorted(set(st_assays) - set(meta["assays"]))
    # No AVG blend while training: the fine-tuned model's is fitted when it ends.
    new_cfg = ModelConfig.from_dict({**base_cfg, "n_cells": len(cells), "n_assays": len(assays),
                                     "cell_individuals": individuals_of(cells), "blend": ()})
    record = {"kind": "finetune", "config": cfg.to_dict(), "store": st.identity(),
              "parent_model": model_dir}
    if tracks is not None:
        record["selection"] = tracks.to_dict()
    loop = {"kind": "finetune", "base_model": model_dir, "n_base_cells": base.cfg.n_cells,
            "n_base_assays": base.cfg.n_assays, "model": new_cfg,
            "new_cell_like": like_rows(meta.get("trained_cell_keys", meta["cell_keys"]),
                                       list(meta["cell_keys"]), cells[base.cfg.n_cells:])}
    new_c, new_a = len(cells) - base.cfg.n_cells, len(assays) - base.cfg.n_assays
    if new_c or new_a:
        log(f"fine-tuning adds {new_c} cell type(s) and {new_a} assay(s) to the vocabulary")
    return _select_then_refit(st, out, cfg, plan, cells, assays, record, loop, resume,
                              in_process)


SELECT_DIR = "select"
"""Where a refit run keeps its model-selection run (a model folder of its own)."""


def _select_then_refit(st: TrackStore, out: str, cfg: TrainConfig, plan: TrackPlan,
                       cells: list[str], assays: list[str], record: dict, loop: dict,
                       resume: bool, in_process: bool) -> dict:
    """:func:`_run`, or with ``cfg.refit`` two runs: model selection on the held-out
    validation tracks into ``out/select``, then the refit into ``out``: the same seed and
    settings on every observed track (the validation tracks become supports and targets)
    for the selected run's best number of epochs, keeping the last. Its validation MSE,
    on tracks it trained on, is in-sample; the record keeps the selection's."""
    if not cfg.refit or not plan.val:
        return _run(st, out, cfg, plan, cells, assays, record, loop, resume, in_process)
    owned.check(out, "model")
    old = checkpoint.read_record(out)
    if old is not None and old.get("status") != "finished" and not checkpoint.latest_checkpoint(out):
        old = None  # an attempt that stopped before its first epoch, as _run treats it
    diff = _diff(old, record) if old is not None else []
    if diff:  # e.g. a model trained without the refit: refused before a selection runs
        raise _other_run(out, old, diff, old.get("status") == "finished")
    _preflight(st, cfg, plan, in_process)
    owned.claim(out, "model")
    sel_cfg = dataclasses.replace(cfg, refit=False)
    sel = _run(st, storage.join(out, SELECT_DIR), sel_cfg, plan, cells, assays,
               {**record, "config": sel_cfg.to_dict()}, loop, resume, in_process)
    epochs = int(sel["best_epoch"])
    every = sorted(plan.inputs + plan.val)
    refit_plan = TrackPlan(every, plan.val, plan.val_source, plan.n_targets,
                           None if plan.targets is None else sorted(plan.targets + plan.val))
    log(f"{record['kind']}: refit on all {len(every)} observed tracks (the {len(plan.val)} "
        f"validation tracks included) for the selected {epochs} epoch(s)")
    # The refit's own record says how many epochs it trains: a selection resumed to a later
    # best epoch then continues the refit from its last checkpoint, which is the same as
    # refitting for the new number of epochs from the start (every epoch is seeded).
    ref_cfg = dataclasses.replace(cfg, epochs=epochs, patience=epochs)
    sel_blend = checkpoint.load_meta(storage.join(out, SELECT_DIR))["model_config"].get("blend")
    record = {**record, "config": ref_cfg.to_dict(),
              "refit": {"folder": SELECT_DIR, "epochs": epochs,
                        "best_val_mse": sel["best_val_mse"], "avg_blend": sel_blend or []}}
    res = _run(st, out, ref_cfg, refit_plan, cells, assays, record,
               {**loop, "keep_last": True, "val_input_cols": plan.inputs}, resume, in_process)
    return {**res, "best_epoch": epochs, "best_val_mse": sel["best_val_mse"],
            "selection": sel}


def _run(st: TrackStore, out: str, cfg: TrainConfig, plan: TrackPlan, cells: list[str],
         assays: list[str], record: dict, loop: dict, resume: bool,
         in_process: bool = False) -> dict:
    """The folder protocol, Ray Train and the final model, for train and finetune.

    ``loop`` holds the :class:`WorkerConfig` fields that ``train``/``finetune`` decide (kind,
    model, base model); the rest are decided here.
    """
    kind = record["kind"]
    owned.check(out, "model")  # a model folder of ours, or a new one: never a user's files
    old = checkpoint.read_record(out)
    if old is None and storage.exists(storage.join(out, "model.pt")):
        raise InputError(f"{out} already holds a model that this command did not train "
                         "(no train.json). Use a new --out folder.")
    resume_from, patience_from, cont = None, 0, False
    latest = checkpoint.latest_checkpoint(out) if old is not None else None
    if old is not None and latest is None and old.get("status") != "finished":
        old = None  # an earlier attempt that stopped before its first epoch: start afresh
    if old is not None:
        diff = _diff(old, record)
        finished = old.get("status") == "finished" and storage.exists(storage.join(out, "model.pt"))
        if diff:
            raise _other_run(out, old, diff, finished)
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
            state = checkpoint.load_state(latest["path"])  # fails early, on the driver, when partial
            resume_from = latest["path"]
            patience_from = int(state["epoch"]) if cont else int(old.get("patience_from", 0))
            log(f"{kind}: resuming {out} from epoch {state['epoch']} ({latest['path']})")
            del state
    elif resume:
        log(f"{kind}: nothing to resume in {out}; starting a new run")

    use_gpu, workers, cpus, local = _preflight(st, cfg, plan, in_process)
    record = {**record, "status": "running", "patience_from": patience_from,
              "updated": _now()}
    owned.claim(out, "model")
    checkpoint.write_record(out, record)
    run_name = checkpoint.next_run_name(out)
    tc, ta = vocab_index(st, cells, assays)
    job = WorkerConfig(
        **loop, train=cfg,
        store=st.path, out=out, input_cols=plan.inputs, val_cols=plan.val,
        target_cols=plan.targets,
        n_targets=plan.n_targets, cell_keys=cells, assays=assays,
        transform=st.transform, use_gpu=use_gpu, threads=cpus,
        resume_from=resume_from, patience_from=patience_from, run_name=run_name,
        track_cells=tc, track_assays=ta, faults=_faults.active(),
    )
    only = ("" if plan.targets is None else
            f" ({len(plan.targets)} of them may be targets, the rest are inputs only)")
    log(f"{kind}: {len(plan.inputs)} training tracks{only}, {len(plan.val)} validation tracks "
        f"({plan.val_source}), {plan.n_targets} targets per bin; {len(cells)} cell types x "
        f"{len(assays)} assays; {workers} worker(s) on {'GPU' if use_gpu else 'CPU'} "
        f"({cpus} CPU each); run {run_name}")
    log(f"{kind} config: {describe_config(cfg)}")
    tc, ta = trained_vocab(st, plan, cells, assays, job.base_model)
    never = [c for c in cells if c not in tc] + [a for a in assays if a not in ta]
    if never:
        log(f"warning: no training track for {', '.join(never[:8])}"
            f"{', ...' if len(never) > 8 else ''}: their embeddings stay untrained, and edice "
            "impute will refuse them as targets. Give them train-split tracks in the manifest "
            "to train them.")
    if local:
        _fit_local(job)
    else:
        _fit(job, workers, cpus)
    return _finalise(out, record, plan, st, cells, assays, job)


def _other_run(out: str, old: dict, diff: list[str], finished: bool) -> InputError:
    return InputError(
        f"{out} holds a {'finished' if finished else 'unfinished'} {old.get('kind')} run "
        f"with a different config or data ({'; '.join(diff)}). Use a new --out folder (or "
        f"restore the old settings to resume it; only {', '.join(sorted(RESUMABLE))} may "
        "change).")


def _preflight(st: TrackStore, cfg: TrainConfig, plan: TrackPlan,
               in_process: bool) -> tuple[bool, int, int, bool]:
    """The run's resources (:func:`_resources`), refused before anything is written when
    the cluster or the genome cannot hold them."""
    use_gpu, workers, cpus, local = _resources(cfg, in_process)
    # Fails here, not on every worker, when the genome is too small for the batches.
    TrainSampler(st, plan.inputs, plan.n_targets, cfg.batch_size // workers, cfg.seed, 0,
                 workers, cfg.bins_per_epoch, cfg.buffer_bins)
    return use_gpu, workers, cpus, local


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _resources(cfg: TrainConfig, in_process: bool = False) -> tuple[bool, int, int, bool]:
    """(use_gpu, workers, CPUs per worker, in process) from the config and what Ray
    reports.

    ``in_process``: one worker in this process whatever the config and the cluster say
    (a task of a workflow that trains many models at once, each with its own CPUs).

    One worker off a cluster runs in this process (:mod:`edice_dist.trainsession`) with
    this machine's CPUs and GPU, and Ray is not started for it. On a cluster that a job
    joined (``RAY_ADDRESS``), GPUs Ray does not report yet are not an error: an autoscaling
    cluster starts with no GPU node and adds them when the trainer asks. On the embedded
    local Ray they are.
    """
    from . import raycluster

    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if in_process:
        cuda = _cuda_count()
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cuda > 0
        if use_gpu and not cuda:
            raise InputError("use_gpu is true but torch sees no GPU here. Set use_gpu to "
                             "false to train on CPUs.")
        return use_gpu, 1, cfg.cpus_per_worker or 1, True
    if not on_cluster:
        cuda = _cuda_count()
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cuda > 0
        if (cfg.workers or (max(cuda, 1) if use_gpu else 1)) == 1:
            if use_gpu and not cuda:
                raise InputError("use_gpu is true but torch sees no GPU on this machine. Drop "
                                 "--use_gpu (or set it to false) to train on CPUs.")
            return use_gpu, 1, cfg.cpus_per_worker or len(os.sched_getaffinity(0)), True
    raycluster.init()
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
    if cfg.batch_size % workers:
        # Each worker takes batch_size // workers bins: the global batch would shrink.
        lo, hi = cfg.batch_size // workers * workers, -(-cfg.batch_size // workers) * workers
        raise InputError(f"batch_size {cfg.batch_size} is not divisible by the {workers} "
                         f"workers it is split across (each would take "
                         f"{cfg.batch_size // workers} bins, a global batch of {lo}). Use a "
                         f"multiple of {workers}, e.g. --batch_size={lo} or --batch_size={hi}.")
    return use_gpu, workers, cpus, False


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


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


def _trainer_class() -> type:
    """Ray Train's TorchTrainer, less its Ctrl-C handler.

    Ray Train replaces the SIGINT handler while it runs: Ctrl-C then aborts the run and the
    process exits with status 1 and no message. Without it, Ctrl-C is a KeyboardInterrupt
    in the driver as in every other stage (``interrupted; re-run ... to resume``, status
    130), and :func:`_fit` aborts the run itself.
    """
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        controller = None

        def _register_sigint_handler(self, controller) -> None:
            self.controller = controller

    return Trainer


def _fit_local(job: WorkerConfig) -> None:
    try:
        run_local(train_loop, job, job.train.max_failures)
    except (EdiceError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - worded like a Ray Train failure
        raise _training_error(e, job.out) from e


def _fit(job: WorkerConfig, workers: int, cpus: int):
    import ray.train
    from ray.train.torch import TorchConfig

    out = job.out
    storage_path, fs = _ray_storage(storage.join(out, "ray"))
    trainer = _trainer_class()(
        # Bound here so that every worker gets the typed config, not Ray's config dict.
        functools.partial(train_loop, job),
        # Fake GPUs (a test fault) compute on CPUs, where NCCL cannot run.
        torch_config=TorchConfig(backend="gloo") if job.faults.get("fake_gpus") else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            # Keep the most recent new best (score = its epoch) and the latest checkpoint.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="best_epoch",
                checkpoint_score_order="max"),
            # Ray Train's per-report INFO lines would drown the one line per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if trainer.controller is not None:  # stop the workers; the checkpoints stay
            import contextlib

            with contextlib.suppress(Exception):
                ray.get(trainer.controller.abort.remote(), timeout=30)
        raise
    except Exception as e:
        raise _training_error(e, out) from e


def _blend(record: dict, plan: TrackPlan, assays: list[str], best: dict) -> tuple[float, ...]:
    """The AVG blend of the finished model (:mod:`edice_dist.blend`): a refit's comes
    from its selection run, which held the validation tracks out; a run's own is fitted
    on its validation tracks at the best epoch; none without ``avg_blend`` or them."""
    if not record["config"].get("avg_blend", False):
        return ()
    if "refit" in record:
        return tuple(record["refit"].get("avg_blend") or ())
    sums = best.get("blend_sums")
    if not plan.val or not sums:
        return ()
    lam = blend.fit(np.asarray(sums), len(assays))
    log(f"{record['kind']}: AVG blend fitted on {len(plan.val)} validation tracks: "
        f"{blend.describe(lam, assays)} (the weight of AVG in imputed tracks)")
    return lam


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
    return EdiceError(
        f"Training failed: {explain(first)} The checkpoints so far are kept in "
        f"{storage.join(out, 'ray')}; run the same command again to resume from the latest."
    )


def _finalise(out: str, record: dict, plan: TrackPlan, st: TrackStore, cells, assays,
              job: WorkerConfig) -> dict:
    """Write the best checkpoint as model.pt (last), history.tsv and the finished record."""
    latest = checkpoint.latest_checkpoint(out)
    if latest is None:
        raise EdiceError(f"Training in {out} reported no checkpoint; run the command again.")
    m = latest["metrics"]
    best_epoch = int(m["best_epoch"])
    if best_epoch == 0:
        raise EdiceError(
            f"Training in {out} never reached a finite validation MSE in {m['epoch']} epochs "
            "(it diverged). Lower lr and train into a new --out folder."
        )
    cands = [c for c in checkpoint.epoch_checkpoints(out)
             if c["epoch"] == best_epoch and c["metrics"]]
    if not cands:
        raise EdiceError(f"The best checkpoint (epoch {best_epoch}) is missing from "
                         f"{storage.join(out, 'ray')}; run the command again with --resume.")
    best = checkpoint.load_state(cands[-1]["path"])
    model = EDICE(ModelConfig.from_dict(best["config"]["model_config"]))
    model.load_state_dict(best["model"])
    model.set_blend(_blend(record, plan, assays, best))
    history = m["history"]
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    ids = st.track_ids()
    trained_cells, trained_assays = trained_vocab(st, plan, cells, assays, job.base_model)
    seen = best.get("seen") or {}
    info = {
        "cell_keys": cells,
        "assays": assays,
        "trained_cell_keys": trained_cells,
        "trained_assays": trained_assays,
        "transform": st.transform,
        "kind": record["kind"],
        "train_config": record["config"],
        "n_targets": plan.n_targets,
        "store": st.path,
        "store_fingerprint": record["store"],
        "train_tracks": [ids[i] for i in plan.inputs],
        "val_tracks": [ids[i] for i in plan.val],
        "val_source": plan.val_source,
        # The store columns the training worker read (supports and targets), drew targets
        # from and validated on, by column and track id (from the checkpoint it wrote).
        "data": {k: {"columns": v, "tracks": [ids[i] for i in v]} for k, v in seen.items()},
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
    if model.cfg.blend:
        info["avg_blend"] = dict(zip(assays, model.cfg.blend, strict=True))
    if "refit" in record:
        # What the epoch count was chosen on; this run's own validation is in-sample.
        info["refit"] = {**record["refit"], "in_sample_val_mse": best_row["val_mse"]}
        info["best_val_mse"] = record["refit"]["best_val_mse"]
    if job.base_model:
        info["parent_model"] = job.base_model
        info["frozen"] = ["cell_embed.table (old rows)", "assay_embed.table (old rows)",
                          "cell_context", "assay_context"]
    checkpoint.write_history(out, history)
    checkpoint.save_model(out, model, info)
    checkpoint.write_record(out, {**record, "status": "finished", "epochs_run": int(m["epoch"]),
                                  "best_epoch": best_epoch, "best_val_mse": best_row["val_mse"],
                                  "updated": _now()})
    if "refit" in record:
        log(f"{record['kind']}: refit done after {m['epoch']} epochs (selection's val MSE "
            f"{record['refit']['best_val_mse']:.4f}; in-sample now {best_row['val_mse']:.4f}) "
            f"saved as {storage.join(out, 'model.pt')}")
    else:
        log(f"{record['kind']}: done after {m['epoch']} epochs; best epoch {best_epoch} (val "
            f"MSE {best_row['val_mse']:.4f}, Pearson {best_row['val_pearson']:.3f}; AVG "
            f"baseline MSE {best_row['avg_mse']:.4f}) saved as {storage.join(out, 'model.pt')}")
    return {"model_dir": out, "status": "trained", "best_epoch": best_epoch,
            "best_val_mse": best_row["val_mse"], "epochs_run": int(m["epoch"])}
