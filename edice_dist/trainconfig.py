"""The training config: every ``edice train`` setting (SPEC section 6), its defaults (the
paper's) and its loading from a config file and ``--KEY=VALUE`` overrides.

The architecture keys (``embed_dim`` ... ``attn_dropout``) are :class:`ModelConfig`'s own
fields and defaults, taken from it rather than written twice; the user still sets them as
flat keys (``--embed_dim=64``).
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Literal

from . import config
from .context import check as check_context
from .errors import InputError
from .model import ModelConfig
from .tracks import individuals_of

VOCAB_FIELDS = ("n_cells", "n_assays", "cell_individuals", "blend")
"""ModelConfig fields that the data decides, not the config."""
NOUN = ("config key", "keys")
"""How messages name a training setting."""
GPUS = "gpus"
"""SPEC 6: ``--gpus`` (all GPUs) or ``--gpus=N`` (N GPU workers); sets use_gpu and workers."""


def _architecture() -> type:
    hints = typing.get_type_hints(ModelConfig)
    return make_dataclass(
        "Architecture",
        [(f.name, hints[f.name], field(default=f.default)) for f in fields(ModelConfig)
         if f.name not in VOCAB_FIELDS],
        namespace={"__module__": __name__,
                   "__doc__": "The architecture keys of ModelConfig, with its defaults."},
    )


Architecture = _architecture()
ARCH_KEYS = tuple(f.name for f in fields(Architecture))
# Keys that may change when a run is resumed: they do not change what was learnt so far.
RESUMABLE = frozenset({"epochs", "patience", "min_delta", "workers", "use_gpu",
                       "cpus_per_worker", "max_failures"})
# Keys added after model folders began recording their config, with the value that runs
# recorded without them had: a folder from before a key was added still resumes.
LATER_KEYS = {"refit": False, "mask_cells": 0.0, "individual_bias": False,
              "same_assay": "none", "peak_weight": 0.0, "average_decay": 0.0,
              "avg_blend": False, "peak_by": "bin", "peak_mean": "bins",
              "peak_target": "bin"}


@dataclass
class TrainConfig(Architecture):
    """Every training setting (SPEC section 6); the defaults are the paper's.

    ``None`` means "decide from the data or the cluster" (shown as ``auto``).
    """

    # New models also read each support's means over windows of 9, 41 and 201 bins around
    # the bin (BENCHMARKS.md, Quality). The paper's model exactly: ``context=none
    # same_assay=none peak_weight=0 average_decay=0 avg_blend=false``.
    context: tuple[int, ...] = (4, 20, 100)
    # New models also read the target assay's signal in the cells most like the target
    # cell straight into the output (:mod:`edice_dist.sameassay`; BENCHMARKS.md, Peaks and
    # broad domains); ``same_assay=none`` is the paper's decoder-only output.
    same_assay: Literal["none", "mean", "attention"] = "attention"
    n_targets: int = 120  # targets per bin (paper: 120) ...
    max_target_fraction: float = 0.5  # ... but at most this share of the training tracks
    # Share of training bins where one random cell has every track as a target (no
    # supports): for imputing a cell type with no observed track (leave-tissue-out).
    mask_cells: float = 0.0
    # Cells of one individual (``cell@individual``) attend to each other with a learned
    # bias, so a person's other tissues inform a tissue of theirs (no effect without
    # individuals; BENCHMARKS.md, Personalised imputation).
    individual_bias: bool = True
    # The loss is MSE + this x the MSE on the target bins in peaks (-log10 p >= 2): MSE
    # alone lets a model flatten the rare peaks to win on the background (BENCHMARKS.md,
    # Peaks and broad domains).
    peak_weight: float = 0.1
    # Which target bins the peak term counts. A bin chosen on its own noisy value pulls a
    # broad mark's level up: in a domain just under the threshold, the bins picked are
    # those whose noise came out high. ``neighbours``: those where the larger of the two
    # adjacent bins, or the mean over the smallest context window (9 bins by default), is
    # a peak: judged without the bin's own noise, so a peak's bins count and a lone noisy
    # bin does not (the adjacent bins alone without a context). ``either``: those whose
    # own value or window mean is (``bin`` without a context); ``bin``: those whose own
    # value is; ``window``: those whose window mean is; ``both``: where both are (these two
    # need a context) (BENCHMARKS.md, Peaks chosen by window; Three more peak rules; The
    # either rule; The neighbours rule).
    peak_by: Literal["neighbours", "either", "bin", "window", "both"] = "neighbours"
    # The peak term's mean: over the batch's peak bins (``bins``), or over assays of each
    # one's peak MSE (``assays``; broad marks have many peak bins, narrow ones few).
    peak_mean: Literal["bins", "assays"] = "bins"
    # What the peak term pulls a peak bin towards: its own value (``bin``), or its mean
    # over the smallest context window (``window``; needs a context), the local signal
    # without the noise that made the bin a peak; on real tracks, whose peaks are sharper
    # than the window, that costs the peaks most (BENCHMARKS.md, Three more peak rules);
    # ``lift``, up to that mean but never down.
    peak_target: Literal["bin", "window", "lift"] = "bin"
    # Validate, checkpoint and impute with an exponential moving average of the weights,
    # this much kept per optimiser step (0: the weights as trained, the paper's). The peak
    # term makes the weights swing between epochs, and the refit keeps its last one
    # unvalidated (:class:`edice_dist.trainloop.WeightAverage`; BENCHMARKS.md, Peaks).
    average_decay: float = 0.999
    # When training ends, fit per assay a weight of AVG in the imputed output on the
    # validation tracks, held-out pairs like imputation's targets (a refit takes its
    # selection's; :mod:`edice_dist.blend`; BENCHMARKS.md, The AVG blend).
    avg_blend: bool = True
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
    val_fraction: float = 0.05  # share of each assay's tracks held out (>= 1) with no val split
    val_bins: int = 20000  # fixed validation bins (all when the genome is smaller)
    # Retrain on every observed track, validation tracks included, for the best epoch's
    # number of epochs: the model selected on held-out tracks, then fitted to all of them.
    refit: bool = True
    max_failures: int = 3  # worker failures Ray Train recovers from (from the last checkpoint)
    buffer_bins: int = 65536  # bins in each worker's mixing buffer (batches mix ~buffer/1024 regions)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 products where native

    def validate(self) -> TrainConfig:
        """Raise InputError on an impossible value; return self."""
        positive = ["embed_dim", "n_heads", "ffn_dim", "decoder_hidden", "decoder_layers",
                    "n_targets", "batch_size", "epochs", "val_bins", "buffer_bins"]
        for k in positive:
            if getattr(self, k) < 1:
                raise InputError(f"Config key {k} must be a positive integer, got {getattr(self, k)}.")
        for k in ("bins_per_epoch", "workers", "cpus_per_worker"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise InputError(f"Config key {k} must be a positive integer or auto, got {v}.")
        for k in ("decoder_dropout", "attn_dropout", "mask_cells", "average_decay"):
            if not 0 <= getattr(self, k) < 1:
                raise InputError(f"Config key {k} must be in [0, 1), got {getattr(self, k)}.")
        for k in ("max_target_fraction", "val_fraction"):
            if not 0 < getattr(self, k) < 1:
                raise InputError(f"Config key {k} must be in (0, 1), got {getattr(self, k)}.")
        if not self.peak_weight >= 0:
            raise InputError(f"Config key peak_weight must be >= 0, got {self.peak_weight}.")
        for k in ("peak_by", "peak_target"):
            # ``either`` without a window is ``bin``: the default runs with context=none;
            # ``neighbours`` is then the adjacent bins alone.
            if (self.peak_weight and getattr(self, k) not in ("bin", "either", "neighbours")
                    and not self.context):
                raise InputError(f"Config key {k}={getattr(self, k)} needs a context window "
                                 f"and context is none: set {k}=bin, or peak_weight=0, or "
                                 "give a context.")
        if not self.lr > 0:
            raise InputError(f"Config key lr must be positive, got {self.lr}.")
        if self.patience < 1 or self.min_delta < 0 or self.max_failures < -1:
            raise InputError("Config keys: patience must be >= 1, min_delta >= 0, "
                             "max_failures >= -1 (-1: unlimited).")
        try:
            self.context = check_context(self.context)
        except ValueError as e:
            raise InputError(f"Config key context: {e}.") from None
        if self.embed_dim % self.n_heads:
            raise InputError(f"embed_dim ({self.embed_dim}) must be divisible by n_heads "
                             f"({self.n_heads}).")
        return self

    def to_dict(self) -> dict:
        """The settings as JSON has them (tuples as lists), so that a record read back
        from ``train.json`` compares equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def model_config(self, cells: list[str], n_assays: int) -> ModelConfig:
        """The model of these settings over the vocabulary ``cells`` (cell keys) x
        ``n_assays`` assays."""
        return ModelConfig(len(cells), n_assays, cell_individuals=individuals_of(cells),
                           **{k: getattr(self, k) for k in ARCH_KEYS})


def config_keys() -> list[str]:
    """The config keys, in order (``gpus`` sets two of them)."""
    return [f.name for f in fields(TrainConfig)]


def _gpus(value, where: str) -> dict:
    s = str(value).strip().lower()
    if s in ("true", "yes", "on", "all", ""):
        return {"use_gpu": True}
    if s in ("false", "no", "off", "0"):
        return {"use_gpu": False}
    n = config.convert(value, int, GPUS, where, minimum=1)
    return {"use_gpu": True, "workers": n}


def values(source: config.Source) -> dict:
    """The training settings of ``source`` (only those given), typed; ``gpus`` expanded.

    Raises
    ------
    InputError
        An unknown key (the message lists the valid ones) or a bad value.
    """
    out = config.values(TrainConfig, source, NOUN, extra=(GPUS,))
    for key, value in source.values.items():
        if str(key).replace("-", "_") == GPUS:
            out.update(_gpus(value, source.where))
    return out


def load_config(config_file: str | None = None, overrides: dict | None = None,
                defaults: dict | None = None, where: str = "command line",
                text: bool = True, prefix: str = "") -> TrainConfig:
    """The training config: the paper's defaults, then ``defaults``, then ``config_file``
    (JSON or YAML), then ``overrides`` (``--KEY=VALUE`` text, or typed values with
    ``text=False``).

    Raises
    ------
    InputError
        On an unknown key (the message lists the valid ones) or a bad value.
    """
    merged = dict(defaults or {})
    if config_file:
        merged.update(values(config.Source(config.read_mapping(config_file),
                                           f"config file {config_file}", text=False)))
    if overrides:
        merged.update(values(config.Source(overrides, where, text, prefix)))
    return TrainConfig(**merged).validate()


def describe_config(cfg: TrainConfig) -> str:
    """``key=value, ...`` of every key (``auto`` for None)."""
    return ", ".join(f"{k}={'auto' if v is None else v}" for k, v in cfg.to_dict().items())
