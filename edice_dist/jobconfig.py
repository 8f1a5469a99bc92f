"""Job config files for cluster runs (``jobs/*.py``): load, check before work, run.

One YAML or JSON file drives every job (``jobs/ingest.py``, ``jobs/train.py``,
``jobs/impute.py``, ``jobs/pipeline.py``); each job reads the keys its stages need::

    out: s3://my-bucket/edice            # store/, model/, run/ go under it by default
    manifest: s3://my-bucket/consortium/manifest.tsv
    chrom_sizes: s3://my-bucket/consortium/hg38.chrom.sizes
    ingest:   {chroms: [chr21], chunk_bins: 16384}
    train:    {epochs: 10, seed: 0}      # training config keys (SPEC section 6)
    impute:   {targets: "K562:H3K27ac"}

Every path may be a local path or a URL (``s3://...``). Relative local paths resolve
against the config file's folder. :func:`edice_dist.preflight.preflight` checks, before any work starts, that
every input exists and every output location can be written, so that a job on a
cluster fails in seconds with a message rather than after an hour of ingest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

from . import storage
from ._configfile import parse_mapping
from .errors import EdiceError, InputError

PATH_KEYS = ("out", "manifest", "chrom_sizes", "store", "model", "run")
"""Top-level keys that hold a path or URL."""

SECTION_KEYS: dict[str, tuple[str, ...]] = {
    # Open sections also accept the keys of SimConfig / TrainConfig (checked when those
    # modules can be imported).
    "simulate": ("out", "seed", "individuals"),
    "ingest": ("chroms", "chunk_bins", "dtype", "workers", "force"),
    "train": ("config_file", "resume"),
    "impute": ("targets", "chroms", "force", "workers", "gpus", "space", "export",
               "batch_bins"),
    "evaluate": ("truth", "out", "space", "plots"),
    "cluster": ("gpus", "gpu_wait_s"),
}
OPEN_SECTIONS = {"simulate": ("edice_dist.simulate", "SimConfig"),
                 "train": ("edice_dist.train", "TrainConfig")}

STAGES = ("simulate", "ingest", "train", "impute", "evaluate")
"""Stages in the order a pipeline runs them."""
GPU_STAGES = ("train", "impute")
DEFAULT_GPU_WAIT_S = 1800

PROBE_CONNECT_TIMEOUT_S = 5
PROBE_READ_TIMEOUT_S = 10


# ----------------------------------------------------------------------------- loading


def _parse(text: str, path: str) -> dict:
    return parse_mapping(text, path, "Job config")


def _open_fields(section: str) -> tuple[str, ...] | None:
    """Field names of SimConfig / TrainConfig, or None when the module is not importable."""
    module, cls = OPEN_SECTIONS[section]
    try:
        import importlib

        klass = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    if dataclasses.is_dataclass(klass):
        return tuple(f.name for f in dataclasses.fields(klass) if not f.name.startswith("_"))
    return None


def _unknown(keys: Iterable[str], valid: Iterable[str], where: str, path: str) -> None:
    bad = sorted(set(keys) - set(valid))
    if bad:
        raise InputError(
            f"Job config {path}: unknown key(s) {', '.join(bad)} in {where}. Valid keys "
            f"there are: {', '.join(sorted(valid))}."
        )


def _resolve(value, key: str, base: str, path: str) -> str | None:
    """A path from the config: URLs and absolute paths as they are, others relative to
    the config file's folder."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"Job config {path}: {key} must be a path or URL string, got {value!r}.")
    value = os.path.expanduser(value.strip())
    if storage.is_url(value) or os.path.isabs(value):
        return value
    if storage.is_url(base):
        return storage.join(base, value)
    return os.path.normpath(os.path.join(base, value))


def _as_list(value, key: str, path: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.replace(",", " ").split()]
    elif isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        items = [str(v) for v in value]
    else:
        raise InputError(f"Job config {path}: {key} must be a list of names, got {value!r}.")
    return [v for v in items if v] or None


def _as_int(value, key: str, path: str, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"Job config {path}: {key} must be an integer >= {minimum}, got {value!r}.")
    return value


def _as_bool(value, key: str, path: str, default: bool | None) -> bool | None:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InputError(f"Job config {path}: {key} must be true or false, got {value!r}.")
    return value


def _as_choice(value, key: str, path: str, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise InputError(f"Job config {path}: {key} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def _is_targets_file(spec: str) -> bool:
    """A targets TSV (path or URL) rather than a list ``cell:assay,...``."""
    return storage.is_url(spec) or spec.endswith((".tsv", ".txt")) or ":" not in spec


def load_job_config(path: str) -> dict:
    """Read and normalise a job config file (YAML, or JSON when it ends in ``.json``).

    Parameters
    ----------
    path : str
        Local path or URL of the file.

    Returns
    -------
    dict
        ``out``, ``manifest``, ``chrom_sizes``, ``store``, ``model``, ``run`` (absolute
        paths or URLs, or None), one dict per section (``simulate``, ``ingest``,
        ``train``, ``impute``, ``evaluate``, ``cluster``; None when the file has no such
        section) and ``config_path``. ``store``/``model``/``run`` default to
        ``OUT/store``, ``OUT/model``, ``OUT/run``; with a ``simulate`` section,
        ``manifest`` and ``chrom_sizes`` default to the simulated ones.

    Raises
    ------
    InputError
        A missing or unparsable file, an unknown key (the message lists the valid
        ones) or a value of the wrong type.
    """
    try:
        if storage.is_url(path):
            text = storage.read_text(path)
        else:
            with open(path, encoding="utf-8") as f:  # also a pipe, e.g. --config <(...)
                text = f.read()
    except FileNotFoundError:
        raise InputError(f"Job config {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Cannot read job config {path}: {e}.") from None
    raw = _parse(text, str(path))
    _unknown(raw, (*PATH_KEYS, *SECTION_KEYS), "the top level", path)
    base = storage.parent(path) if storage.is_url(path) else os.path.dirname(os.path.abspath(path))
    cfg: dict = {k: _resolve(raw.get(k), k, base, path) for k in PATH_KEYS}

    for name, fixed in SECTION_KEYS.items():
        if name not in raw:
            cfg[name] = None
            continue
        sec = raw[name]
        if sec is None or sec is True:  # `evaluate:` alone asks for the defaults
            sec = {}
        if not isinstance(sec, dict):
            raise InputError(
                f"Job config {path}: {name} must be a mapping of options (or {{}} for the "
                f"defaults), got {sec!r}."
            )
        valid: tuple[str, ...] = fixed
        if name in OPEN_SECTIONS:
            fields = _open_fields(name)
            valid = fixed + (fields if fields is not None else tuple(sec))
        _unknown(sec, valid, f"the {name} section", path)
        cfg[name] = dict(sec)

    if cfg["ingest"] is not None:
        s = cfg["ingest"]
        s["chroms"] = _as_list(s.get("chroms"), "ingest.chroms", path)
        s["chunk_bins"] = _as_int(s.get("chunk_bins"), "ingest.chunk_bins", path)
        s["workers"] = _as_int(s.get("workers"), "ingest.workers", path)
        s["dtype"] = _as_choice(s.get("dtype"), "ingest.dtype", path, ("float16", "float32"))
        s["force"] = _as_bool(s.get("force"), "ingest.force", path, False)
    if cfg["train"] is not None:
        s = cfg["train"]
        s["config_file"] = _resolve(s.get("config_file"), "train.config_file", base, path)
        s["resume"] = _as_bool(s.get("resume"), "train.resume", path, None)
    if cfg["impute"] is not None:
        s = cfg["impute"]
        t = s.get("targets")
        if isinstance(t, list):
            s["targets"] = ",".join(str(x) for x in t)
        elif t is not None and not isinstance(t, str):
            raise InputError(
                f"Job config {path}: impute.targets must be a file, a list of cell:assay or a "
                f"string cell:assay,cell:assay, got {t!r}."
            )
        elif isinstance(t, str) and _is_targets_file(t):
            s["targets"] = _resolve(t, "impute.targets", base, path)
        s["chroms"] = _as_list(s.get("chroms"), "impute.chroms", path)
        s["workers"] = _as_int(s.get("workers"), "impute.workers", path)
        s["gpus"] = _as_int(s.get("gpus"), "impute.gpus", path, minimum=0)
        s["batch_bins"] = _as_int(s.get("batch_bins"), "impute.batch_bins", path)
        s["space"] = _as_choice(s.get("space"), "impute.space", path, ("pval", "arcsinh")) or "pval"
        s["force"] = _as_bool(s.get("force"), "impute.force", path, False)
        s["export"] = _as_bool(s.get("export"), "impute.export", path, True)
    if cfg["simulate"] is not None:
        s = cfg["simulate"]
        out = s.get("out")
        if out is None:
            if cfg["out"] is None:
                raise InputError(
                    f"Job config {path}: the simulate section needs `out:` (where to write "
                    "the consortium), or set `out:` at the top level."
                )
            s["out"] = storage.join(cfg["out"], "consortium")
        else:
            s["out"] = _resolve(out, "simulate.out", base, path)
        cfg["manifest"] = cfg["manifest"] or storage.join(s["out"], "manifest.tsv")
        cfg["chrom_sizes"] = cfg["chrom_sizes"] or storage.join(s["out"], "chrom.sizes")
    if cfg["evaluate"] is not None:
        s = cfg["evaluate"]
        truth = s.get("truth")
        if truth is None and cfg["simulate"] is not None:
            truth = storage.join(cfg["simulate"]["out"], "truth", "targets.tsv")
            s["truth"] = truth
        else:
            s["truth"] = _resolve(truth, "evaluate.truth", base, path)
        s["out"] = _resolve(s.get("out"), "evaluate.out", base, path)
        if s["out"] is None and cfg["out"] is not None:
            s["out"] = storage.join(cfg["out"], "evaluation")
        s["space"] = _as_choice(s.get("space"), "evaluate.space", path, ("arcsinh", "pval")) or "arcsinh"
        s["plots"] = _as_bool(s.get("plots"), "evaluate.plots", path, True)
    if cfg["cluster"] is not None:
        s = cfg["cluster"]
        s["gpus"] = _as_int(s.get("gpus"), "cluster.gpus", path, minimum=0) or 0
        s["gpu_wait_s"] = _as_int(s.get("gpu_wait_s"), "cluster.gpu_wait_s", path) or DEFAULT_GPU_WAIT_S
    if cfg["out"] is not None:
        for key in ("store", "model", "run"):
            cfg[key] = cfg[key] or storage.join(cfg["out"], key)
    cfg["config_path"] = str(path)
    return cfg


def stages_for(job: str, cfg: dict) -> tuple[str, ...]:
    """The stages a job runs: one for a stage job; for ``pipeline`` (simulate if
    configured) ingest, train, impute (evaluate if configured)."""
    if job == "pipeline":
        return tuple(s for s in STAGES
                     if s in ("ingest", "train", "impute") or cfg.get(s) is not None)
    if job not in ("ingest", "train", "impute", "simulate", "evaluate"):
        raise ValueError(f"unknown job {job!r}")
    return (job,)


# ----------------------------------------------------------------------------- running


def _train_overrides(opts: dict) -> dict[str, str]:
    out = {}
    for k, v in opts.items():
        if k in SECTION_KEYS["train"] or v is None:
            continue
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def run_stages(cfg: dict, stages: Iterable[str]) -> dict:
    """Run ``stages`` in order with the options of ``cfg``; Ray must be initialised.

    With ``cluster.gpus`` set, the autoscaler is asked for that many GPUs before the first
    training or imputation stage (:func:`wait_for_gpus`), and the request is withdrawn
    when the stages end or fail, so that idle GPU nodes can go.

    Returns
    -------
    dict
        The paths written, by stage.
    """
    from .progress import log

    stages = tuple(stages)
    done: dict[str, str] = {}
    want_gpus = (cfg.get("cluster") or {}).get("gpus", 0)
    requested = False
    try:
        for i, stage in enumerate(stages, 1):
            if stage in GPU_STAGES and want_gpus and not requested:
                requested = True
                wait_for_gpus(want_gpus, cfg["cluster"]["gpu_wait_s"])
            log(f"=== [{i}/{len(stages)}] {stage}")
            _run_stage(cfg, stage, done)
    finally:
        if requested:
            release_gpus()
    return done


def wait_for_gpus(n: int, timeout_s: float, poll_s: float = 5.0) -> int:
    """Ask the autoscaler for ``n`` GPUs and wait until Ray reports them.

    An autoscaling cluster starts with no GPU node (``min_workers: 0``), and training and
    imputation size themselves from the GPUs Ray reports when they start; so a job asks
    for its GPUs first. Returns the GPUs Ray reports.

    Raises
    ------
    EdiceError
        When fewer than ``n`` GPUs appeared within ``timeout_s`` seconds.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    from .progress import log

    have = int(ray.cluster_resources().get("GPU", 0))
    if have >= n:
        return have
    log(f"cluster: asking the autoscaler for {n} GPU(s) ({have} now); waiting up to "
        f"{timeout_s:.0f} s")
    request_resources(bundles=[{"GPU": 1}] * n)
    t0 = last = time.monotonic()
    while True:
        have = int(ray.cluster_resources().get("GPU", 0))
        if have >= n:
            log(f"cluster: {have} GPU(s) ready after {time.monotonic() - t0:.0f} s")
            return have
        now = time.monotonic()
        if now - t0 >= timeout_s:
            raise EdiceError(
                f"The job asked for {n} GPU(s) (cluster.gpus) but after {timeout_s:.0f} s the "
                f"Ray cluster has {have}. Check the autoscaler (`ray status`; `ray monitor "
                "cluster/aws.yaml`), the cloud's GPU quota and the GPU worker type's "
                "max_workers, or lower cluster.gpus / raise cluster.gpu_wait_s."
            )
        if now - last >= 60:
            last = now
            log(f"cluster: {have}/{n} GPU(s) after {now - t0:.0f} s")
        time.sleep(min(poll_s, max(0.1, timeout_s - (now - t0))))


def release_gpus() -> None:
    """Withdraw the request of :func:`wait_for_gpus`, so that idle GPU nodes go away."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def _run_stage(cfg: dict, stage: str, done: dict) -> None:
    """Run one stage; record what it wrote in ``done``."""
    opts = cfg.get(stage) or {}
    if stage == "simulate":
        from .simulate import SimConfig, simulate

        over = {k: str(v) for k, v in opts.items() if k != "out" and v is not None}
        simulate(opts["out"], SimConfig.from_overrides(over))
        done[stage] = opts["out"]
    elif stage == "ingest":
        from .ingest import ingest

        ingest(cfg["manifest"], cfg["chrom_sizes"], cfg["store"], force=opts.get("force", False),
               chroms=opts.get("chroms"), chunk_bins=opts.get("chunk_bins"),
               dtype=opts.get("dtype"), workers=opts.get("workers"))
        done[stage] = cfg["store"]
    elif stage == "train":
        from .train import load_config, train

        tcfg = load_config(opts.get("config_file"), _train_overrides(opts))
        # An interrupted run resumes by itself; resume=True trains a finished one further.
        train(cfg["store"], cfg["model"], tcfg, resume=bool(opts.get("resume")))
        done[stage] = cfg["model"]
    elif stage == "impute":
        from .impute import impute

        impute(cfg["store"], cfg["model"], cfg["run"], targets=opts.get("targets"),
               chroms=opts.get("chroms"), force=opts.get("force", False),
               workers=opts.get("workers"), gpus=opts.get("gpus"),
               space=opts.get("space", "pval"), export=opts.get("export", True),
               batch_bins=opts.get("batch_bins"))
        done[stage] = cfg["run"]
    elif stage == "evaluate":
        from .evaluate import evaluate

        evaluate(opts["truth"], storage.join(cfg["run"], "bigwig"), store=cfg["store"],
                 out=opts.get("out"), space=opts.get("space", "arcsinh"),
                 plots=opts.get("plots", True))
        done[stage] = opts.get("out") or ""
    else:
        raise ValueError(f"unknown stage {stage!r}")
