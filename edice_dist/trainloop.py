"""What each Ray Train worker of a training run does (:func:`train_loop`).

The driver (:mod:`edice_dist.train`) hands every worker the same :class:`WorkerConfig`.
A worker reads its own share of the bins straight from the store
(:mod:`edice_dist.sampler`), trains a DDP replica, validates on its share of the
validation bins (metrics summed over workers) and reports one checkpoint per epoch
(written by rank 0) into the model folder's ``ray/`` (:mod:`edice_dist.checkpoint`).
After a worker failure, Ray Train restarts every worker and they continue from the
newest checkpoint of the run.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import _faults, blend, checkpoint, storage
from .checkpoint import HISTORY_COLUMNS, METRICS, STATE
from .errors import InputError
from .metrics import PEAK_PVAL
from .model import EDICE, ModelConfig, extend_vocab, init_seed
from .predict import encode_batch_bins, resolve_dtype
from .sameassay import SKIP_MAX_LR
from .sampler import (
    Batch,
    TrainSampler,
    avg_weights,
    read_validation,
    validation_plan,
)
from .store import open_store
from .trainconfig import TrainConfig
from .trainsession import RaySession


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of a run receives from the driver (small: no data).

    Attributes
    ----------
    kind : "train" or "finetune".
    train : the run's training settings.
    model : the architecture and vocabulary size of the model trained.
    store, out : the track store and the model folder (paths or URLs).
    run_name : this invocation's folder under ``out/ray``.
    input_cols, val_cols : store columns of the training and the validation tracks.
    n_targets : targets per training bin after the cap.
    cell_keys, assays : the model's vocabulary.
    transform : the store's value transform (recorded in checkpoints).
    track_cells, track_assays : per store column, its index in the vocabulary.
    use_gpu, threads : the worker's device and torch threads.
    resume_from : the checkpoint folder the driver chose to continue from, if any.
    patience_from : the epoch from which a stale validation MSE counts toward patience.
    base_model, n_base_cells, n_base_assays : for fine-tuning, the base model's folder and
        vocabulary size (its embedding rows stay frozen).
    new_cell_like : for fine-tuning, per new cell row the base rows it starts from
        (:func:`edice_dist.model.extend_vocab`).
    target_cols : the input columns that may be training targets (all when None).
    val_input_cols : the supports of validation (``input_cols`` when None); a refit trains
        on its validation tracks, and validates with the selection run's supports.
    keep_last : a refit: every epoch counts as the best, no early stop (the number of
        epochs was chosen by the selection run).
    faults : test-only faults (:mod:`edice_dist._faults`).
    """

    kind: str
    train: TrainConfig
    model: ModelConfig
    store: str
    out: str
    run_name: str
    input_cols: list[int]
    val_cols: list[int]
    n_targets: int
    cell_keys: list[str]
    assays: list[str]
    transform: str
    track_cells: list[int]
    track_assays: list[int]
    use_gpu: bool
    threads: int
    resume_from: str | None = None
    patience_from: int = 0
    base_model: str | None = None
    n_base_cells: int = 0
    n_base_assays: int = 0
    new_cell_like: list[list[int]] | None = None
    target_cols: list[int] | None = None
    val_input_cols: list[int] | None = None
    keep_last: bool = False
    faults: dict = field(default_factory=dict)


def autocast_for(device: torch.device, precision: str = "auto"):
    """bf16 autocast of the matrix products where ``precision`` asks for it; with
    ``auto``, on CUDA and on CPUs that multiply bf16 natively (AVX-512 BF16, AMX), decided
    here on the worker's own device. Weights, optimizer state and the loss stay float32."""
    if precision == "float32":
        return nullcontext()
    if precision == "auto" and resolve_dtype(device) != torch.bfloat16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _initial_model(config: WorkerConfig, state: dict | None) -> EDICE:
    """The model before DDP: from a checkpoint, from the base model (fine-tuning) or new."""
    mcfg = config.model
    if state is not None:
        model = EDICE(mcfg)
        # With a weight average, "model" is the average and "train_model" what trains on.
        model.load_state_dict(state.get(TRAIN_MODEL, state["model"]))
        return model
    if config.base_model:
        base, _ = checkpoint.load_model(config.base_model, "cpu")
        model = extend_vocab(base, mcfg.n_cells, mcfg.n_assays, like=config.new_cell_like,
                             individuals=mcfg.cell_individuals[base.cfg.n_cells:]).train()
        model.set_blend(())  # fitted again when this run ends (:mod:`edice_dist.blend`)
        return model
    init_seed(config.train.seed)
    return EDICE(mcfg)


TRAIN_MODEL = "train_model"
"""Checkpoint key of the trained weights when the checkpoint's ``model`` is their average."""


class WeightAverage:
    """An exponential moving average of a model's weights, updated after every optimiser
    step: ``avg += (1 - d) (w - avg)`` with ``d = min(decay, (1 + n) / (10 + n))`` after
    ``n`` steps, so that the first steps do not weigh the random start.

    The peak term of the loss makes the weights swing from step to step (validation MSE
    moved by up to 17 % between epochs); the average is what validation scores and what a
    checkpoint gives as the model (BENCHMARKS.md, Peaks and broad domains).

    Parameters
    ----------
    net : the model being trained (its parameters are read, never written).
    decay : the most weight the average keeps per step, in (0, 1).
    state : a checkpoint written with an average: it continues from there.
    """

    def __init__(self, net: EDICE, decay: float, state: dict | None = None):
        self.decay = decay
        self.model = copy.deepcopy(net)
        self.model.requires_grad_(False)
        self.updates = 0
        if state is not None and TRAIN_MODEL in state:
            self.model.load_state_dict(state["model"])
            self.updates = int(state["average_updates"])
        self._avg = list(self.model.parameters())
        self._live = list(net.parameters())

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._avg, self._live, 1.0 - d)


PEAK_ARCSINH = math.asinh(PEAK_PVAL)
"""The peak threshold (-log10 p >= 2) in the model's arcsinh space."""


def training_loss(pred: torch.Tensor, y: torch.Tensor, peak_weight: float,
                  level: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                  n_groups: int | None = None, peak_to: torch.Tensor | None = None,
                  lift_only: bool = False) -> torch.Tensor:
    """MSE over every target bin, plus ``peak_weight`` times the MSE over the target bins in
    peaks (``level >= PEAK_ARCSINH``; 0 when the batch has none).

    The field scores both (SPEC 4: MSE, and MSE on the peaks). Peaks are 1 to 5 % of the
    bins, so plain MSE lets a model flatten them to win on the background; the second term
    weighs them as one metric of their own, whatever their share in a consortium.

    Parameters
    ----------
    pred, y : (B, K) predictions and observed values of the targets.
    level : (B, K), optional
        What decides a peak bin; ``y`` when not given. A bin chosen on its own noisy value
        has, on average, noise above its expectation, so weighing it more pulls the
        prediction above the expectation wherever that is uncertain; a window's mean
        (``peak_by=window``) carries a ninth of the bin's noise.
    groups : (B, K) long, optional
        Each target's assay (``peak_mean=assays``): the peak term is then the mean over the
        assays with peak bins in the batch of each one's peak MSE, as the field's mean
        over tracks weighs a narrow mark's few peaks like a broad mark's many.
    n_groups : int, optional
        More than the largest group id (read from ``groups`` when not given, which waits
        for a GPU).
    peak_to : (B, K), optional
        What the peak term pulls the peak bins towards; ``y`` when not given. A bin chosen
        because its own value is a peak has its noise up, and pulling it towards that
        value lifts a broad mark's whole domain; towards its window's mean
        (``peak_target=window``) it is pulled to the local signal, with a ninth of the
        noise.
    lift_only : bool
        The peak term only lifts a peak bin up to ``peak_to``, never pulls it down
        (``peak_target=lift``): a real peak's summit stands above its window's mean.
    """
    err = (pred - y).square()
    loss = err.mean()
    if peak_weight:
        if peak_to is not None:
            gap = peak_to - pred
            err = (gap.clamp(min=0) if lift_only else gap).square()
        peak = ((y if level is None else level) >= PEAK_ARCSINH).to(err.dtype)
        if groups is None:
            return loss + peak_weight * (err * peak).sum() / peak.sum().clamp(min=1)
        n = int(groups.max()) + 1 if n_groups is None else n_groups
        cnt = torch.zeros(n, dtype=err.dtype, device=err.device).index_add_(
            0, groups.flatten(), peak.flatten())
        tot = torch.zeros(n, dtype=err.dtype, device=err.device).index_add_(
            0, groups.flatten(), (err * peak).flatten())
        # Averaged over the assays with peak bins without asking the device which those
        # are (a Python branch on a tensor waits for a GPU every step).
        per = tot / cnt.clamp(min=1)
        loss = loss + peak_weight * per.sum() / (cnt > 0).sum().clamp(min=1)
    return loss


def window_mean(batch: Batch) -> torch.Tensor:
    """Each target's mean over the smallest context window (B, K): channel 1 of its column
    in ``batch.x`` (the inputs keep a target's values; the model sees them masked)."""
    return torch.gather(batch.x[..., 1], 1, batch.target)


def peak_level(batch: Batch, peak_by: str) -> torch.Tensor | None:
    """What decides the peak bins of :func:`training_loss` (B, K): None for ``bin`` (the
    targets' own values); for ``window``, each target's :func:`window_mean`; for
    ``both``, the smaller of the two, so that a bin counts when its own value and its
    window's mean are peaks: a lone noisy bin in a broad domain below the threshold does
    not; for ``either``, the larger, so that a bin counts when either is: every bin of a
    raised window counts whatever its own noise, and a sharp peak still counts; for
    ``neighbours``, the larger of the window's mean and the larger of the two adjacent
    bins (:attr:`Batch.near`; the latter alone without a context): a peak judged without
    the bin's own noise, so that the bins it picks in a domain below the threshold are
    not the ones whose noise came out high.

    Batches without context channels have no window: ``either`` is then ``bin`` and
    ``neighbours`` the adjacent bins alone (``window`` and ``both`` need one)."""
    windowed = batch.x.dim() == 3
    if peak_by == "bin" or (peak_by == "either" and not windowed):
        return None
    if peak_by == "neighbours":
        if batch.near is None:
            raise ValueError("peak_by=neighbours needs batches from a sampler with neighbours")
        return torch.maximum(window_mean(batch), batch.near) if windowed else batch.near
    window = window_mean(batch)
    if peak_by == "window":
        return window
    pick = torch.minimum if peak_by == "both" else torch.maximum
    return pick(window, batch.y)


def param_groups(net: EDICE, lr: float) -> list[dict]:
    """The trainable parameters, the same-assay skip's read-out weights in a group of their
    own at ``min(lr, SKIP_MAX_LR)``: they are scaled by ``SKIP_SCALE`` so that they move
    fast enough at the paper's learning rate, and at the 3e-3 of a short run they jumped
    by a third of their range per step and cost held-out MSE."""
    skip = net.same_assay_skip.weight if net.same_assay_skip is not None else None
    rest = [p for p in net.parameters() if p.requires_grad and p is not skip]
    if skip is None or not skip.requires_grad:
        return [{"params": rest}]
    return [{"params": rest}, {"params": [skip], "lr": min(lr, SKIP_MAX_LR)}]


def finetune_trainable(model: EDICE, n_base_cells: int, n_base_assays: int) -> dict:
    """Freeze what SPEC 2.7 freezes; return {parameter: number of leading frozen rows} for
    the embedding tables whose new rows train (their old rows get zero gradients)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in (model.cell_embed.linear, model.assay_embed.linear, model.decoder, model.output):
        for p in m.parameters():
            p.requires_grad_(True)
    if model.same_assay_skip is not None:  # its read-out is the decoder's; its queries and
        model.same_assay_skip.weight.requires_grad_(True)  # keys are attention (frozen)
    masks = {}
    for table, n_old in ((model.cell_embed.table.weight, n_base_cells),
                         (model.assay_embed.table.weight, n_base_assays)):
        if table.shape[0] > n_old:
            table.requires_grad_(True)
            masks[table] = n_old
    return masks


def train_loop(config: WorkerConfig, session=None) -> None:
    """One worker of a training run: Ray Train calls it on every worker (``session``
    None), :func:`edice_dist.trainsession.run_local` in the driver's process.

    Reads this worker's share of the bins straight from the store, trains a DDP replica,
    validates on its share of the validation bins (metrics summed over workers) and reports
    one checkpoint per epoch (written by rank 0).
    """
    if session is None:
        _quiet_ray_train()
        session = RaySession()
    rank, world = session.rank, session.world
    cfg = config.train
    device = session.device(config.use_gpu, bool(config.faults.get("fake_gpus")))
    torch.set_num_threads(config.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    st = open_store(config.store)
    inputs = np.asarray(config.input_cols, dtype=np.int64)
    val_cols = np.asarray(config.val_cols, dtype=np.int64)
    tc = np.asarray(config.track_cells, dtype=np.int64)
    ta = np.asarray(config.track_assays, dtype=np.int64)
    in_cells = torch.from_numpy(tc[inputs]).to(device)
    in_assays = torch.from_numpy(ta[inputs]).to(device)
    vin = inputs if config.val_input_cols is None else np.asarray(config.val_input_cols,
                                                                   dtype=np.int64)
    vin_cells = torch.from_numpy(tc[vin]).to(device)
    vin_assays = torch.from_numpy(ta[vin]).to(device)
    val_cells = torch.from_numpy(tc[val_cols]).to(device)
    val_assays = torch.from_numpy(ta[val_cols]).to(device)

    state, why = _restore(config, session)

    net = _initial_model(config, state).to(device)
    masks = {}
    if config.kind == "finetune":
        masks = finetune_trainable(net, config.n_base_cells, config.n_base_assays)
    average = WeightAverage(net, cfg.average_decay, state) if cfg.average_decay else None
    model = session.prepare(net)
    # eps as the reference implementation's (Keras' default, 1e-7; torch's is 1e-8); one
    # fused kernel per step instead of a dozen passes over every parameter.
    opt = torch.optim.Adam(param_groups(net, cfg.lr), lr=cfg.lr, eps=1e-7, fused=True)
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
        if state.get("stopped") and int(state["epoch"]) > config.patience_from:
            return  # this run already stopped early; nothing left to do
    patience_from = config.patience_from

    ctx = config.model.context
    targets = None if config.target_cols is None else np.isin(inputs, config.target_cols)
    sampler = TrainSampler(st, inputs, config.n_targets, cfg.batch_size // world, cfg.seed,
                           rank, world, cfg.bins_per_epoch, cfg.buffer_bins, context=ctx,
                           targets=targets, cells=tc[inputs], mask_cells=cfg.mask_cells,
                           neighbours=bool(cfg.peak_weight) and cfg.peak_by == "neighbours")
    # What this worker reads, as it reads it: the model folder records it (model.json
    # "data"), so that a test can check from the data which tracks a model saw.
    seen = {"inputs": sampler.columns.tolist(),
            "targets": (sampler.columns if targets is None else sampler.columns[targets]).tolist(),
            "val": val_cols.tolist()}
    vplan = validation_plan(st, cfg.val_bins, cfg.seed)
    xv, yv = read_validation(st, vplan, vin, val_cols, rank, world, context=ctx)
    w_avg = avg_weights(tc[vin], ta[vin], tc[val_cols], ta[val_cols])

    for epoch in range(start, cfg.epochs + 1):
        torch.manual_seed(_mix_seed(cfg.seed, epoch, rank))  # dropout
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for batch in sampler.batches(epoch):
            b = batch.to(device)
            with autocast_for(device, cfg.precision):
                pred = model(b.x, b.support, in_cells, in_assays, in_cells[b.target],
                             in_assays[b.target])
            loss = training_loss(pred.float(), b.y, cfg.peak_weight,
                                 peak_level(b, cfg.peak_by) if cfg.peak_weight else None,
                                 in_assays[b.target] if cfg.peak_mean == "assays" else None,
                                 config.model.n_assays,
                                 window_mean(b) if cfg.peak_weight
                                 and cfg.peak_target != "bin" else None,
                                 cfg.peak_target == "lift")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, n_old in masks.items():
                p.grad[:n_old] = 0
            opt.step()
            if average is not None:
                average.update()
            loss_sum += loss.detach()
            steps += 1
            if config.faults.get("train_exit_epoch") == epoch and rank == world - 1:
                _faults.exit_once(config.out, f"worker {rank} exited during epoch {epoch}")
            if config.faults.get("train_lose_node_epoch") == epoch and rank == world - 1:
                _faults.exit_once(config.out, f"the node of worker {rank} was lost during "
                                  f"epoch {epoch}", whole_node=True)
        train_s = time.perf_counter() - t0
        scored = net if average is None else average.model
        val, bsums = _validate(scored, xv, yv, w_avg, vin_cells, vin_assays, val_cells,
                               val_assays, cfg.batch_size, device, cfg.precision)
        agg = _all_reduce(torch.cat([val, torch.stack([loss_sum, torch.tensor(
            float(steps), dtype=torch.float64, device=device)]), bsums.flatten()]))
        metrics = _val_metrics(agg[:8])
        metrics["train_loss"] = float(agg[8] / max(agg[9], 1))
        blend_sums = agg[10:].view(-1, 2).cpu().tolist()
        metrics["bins_per_s"] = steps * (cfg.batch_size // world) * world / max(train_s, 1e-9)
        metrics["seconds"] = time.perf_counter() - t0
        improved = config.keep_last or metrics["val_mse"] < best_mse - cfg.min_delta
        if improved:
            best_epoch, best_mse = epoch, metrics["val_mse"]
        stale = epoch - max(best_epoch, patience_from)
        stopped = stale >= cfg.patience and epoch < cfg.epochs and not config.keep_last
        row = {"epoch": epoch, **{k: metrics[k] for k in HISTORY_COLUMNS[1:-1]},
               "best": int(improved)}
        history.append(row)
        report = {**row, "best_epoch": best_epoch if improved else 0, "stopped": int(stopped)}
        _report(config, session, epoch, net, opt, history, restores, best_epoch, best_mse,
                stopped, report, seen, average, blend_sums)
        if rank == 0:
            _worker_log(_epoch_line(config.kind, epoch, cfg.epochs, metrics, improved))
            checkpoint.write_history(config.out, history)
        if stopped:
            if rank == 0:
                _worker_log(f"{config.kind}: no better validation MSE for {stale} epochs "
                            f"(patience {cfg.patience}); stopping early, best epoch {best_epoch}")
            break


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


def _restore(config: WorkerConfig, session) -> tuple[dict | None, str | None]:
    """The state to continue from: after a worker failure, the newest checkpoint of this
    run; otherwise the checkpoint the driver chose (``resume_from``), if any.

    Ray Train hands back the last checkpoint it registered; one reported just before the
    failure may not be registered yet, so the run's folder is looked at as well and the
    newer complete one wins.
    """
    handed = session.restored_state()
    found = [handed] if handed is not None else []
    run_dir = storage.join(config.out, "ray", config.run_name)
    for c in reversed([c for c in checkpoint.epoch_checkpoints(config.out)
                       if c["run"] == config.run_name]):
        if found and c["epoch"] <= int(found[0]["epoch"]):
            break
        try:
            found.append(checkpoint.load_state(c["path"]))
            break
        except InputError:  # cut short by the failure: use an older one
            continue
    if found:
        state = max(found, key=lambda s: int(s["epoch"]))
        _worker_log(f"{config.kind}: restarted after a failure; continuing from epoch "
                    f"{state['epoch']} ({run_dir})")
        return state, "worker failure"
    if config.resume_from:
        return checkpoint.load_state(config.resume_from), "resume"
    return None, None


def _validate(net: EDICE, xv: np.ndarray, yv: np.ndarray, w_avg: np.ndarray, in_cells,
              in_assays, val_cells, val_assays, batch: int, device,
              precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over this worker's validation bins (float64, on ``device``): n, sum p, sum y,
    sum p^2, sum y^2, sum p*y, squared error, AVG's squared error; and (V, 2) per
    validation track, the sums that fit the AVG blend (:func:`edice_dist.blend.validation_sums`)."""
    sums = torch.zeros(8, dtype=torch.float64)
    bsums = torch.zeros(len(val_cells), 2, dtype=torch.float64)
    net.eval()
    # AVG in torch, on the thread pool of the model: numpy's BLAS threads, woken once per
    # batch, spin on the same cores and made validation 2x slower.
    w64 = torch.from_numpy(w_avg).double()
    has_avg = w64.sum(0) > 0
    # No gradients, so up to 4 training batches at once, as far as the attention's
    # activations allow: they grow with the cells squared (BENCHMARKS.md, issue 22).
    step = encode_batch_bins(net.cfg, len(in_cells), len(torch.unique(val_cells)),
                             len(torch.unique(val_assays)), most=4 * batch, device=device)
    with torch.no_grad():
        for i in range(0, len(xv), step):
            xb = np.asarray(xv[i:i + step], dtype=np.float32)
            x = torch.from_numpy(xb).to(device)
            y = torch.from_numpy(yv[i:i + step]).double()
            support = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
            with autocast_for(device, precision):
                p = net(x, support, in_cells, in_assays, val_cells, val_assays)
            p = p.double().cpu()
            values = x[..., 0] if x.dim() == 3 else x  # AVG takes the bins' own values
            avg = values.cpu().double() @ w64
            sums += torch.stack([torch.tensor(float(p.numel()), dtype=torch.float64), p.sum(),
                                 y.sum(), (p * p).sum(), (y * y).sum(), (p * y).sum(),
                                 ((p - y) ** 2).sum(), ((avg - y) ** 2).sum()])
            bsums += blend.validation_sums(p, y, avg, has_avg)
    net.train()
    return sums.to(device), bsums.to(device)


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


def _cpu_weights(m: EDICE) -> dict:
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}


def _report(config, session, epoch, net, opt, history, restores, best_epoch, best_mse, stopped,
            metrics, seen, average: WeightAverage | None = None, blend_sums=None):
    """Report the epoch on every worker; rank 0 attaches the checkpoint's files.

    With a weight average, the checkpoint's ``model`` is the average (what validation
    scored and what imputation uses) and ``train_model`` the weights training goes on from.
    """
    name = f"epoch_{epoch:04d}"
    if session.rank != 0:
        session.report(metrics, None, name)
        return
    state = {
        "model": _cpu_weights(net if average is None else average.model),
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "history": history,
        "restores": restores,
        "best_epoch": best_epoch,
        "best_val_mse": best_mse,
        "stopped": bool(stopped),
        "config": {"train_config": asdict(config.train), "model_config": config.model.to_dict(),
                   "kind": config.kind, "base_model": config.base_model},
        "cell_keys": config.cell_keys,
        "assays": config.assays,
        "transform": config.transform,
        "seen": seen,
        "blend_sums": blend_sums,
    }
    if average is not None:
        state[TRAIN_MODEL] = _cpu_weights(net)
        state["average_updates"] = average.updates
    buf = io.BytesIO()
    torch.save(state, buf)
    summary = {"epoch": epoch, "best_epoch": best_epoch, "best_val_mse": best_mse,
               "stopped": bool(stopped), "history": history, "restores": restores}
    session.report(metrics, {STATE: buf.getvalue(), METRICS: json.dumps(summary).encode()}, name)
