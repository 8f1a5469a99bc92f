"""Job config files for cluster runs (``jobs/*.py``): load, check before work, run.

One YAML or JSON file drives every job (``jobs/ingest.py``, ``jobs/train.py``,
``jobs/impute.py``, ``jobs/pipeline.py``); each job reads the keys its stages need::

    out: s3://my-bucket/edice            # store/, model/, run/ go under it by default
    manifest: s3://my-bucket/consortium/manifest.tsv
    chrom_sizes: s3://my-bucket/consortium/hg38.chrom.sizes
    ingest:   {chroms: [chr21], chunk_bins: 16384}
    train:    {epochs: 10, seed: 0}      # training config keys (SPEC section 6)
    impute:   {targets: "K562:H3K27ac"}

A stage's section holds the options of ``edice <stage>`` (:mod:`edice_dist.stages`;
YAML values, typed), and the stages run through the same stage runner as the command
line. Every path may be a local path or a URL (``s3://...``). Relative local paths
resolve against the config file's folder. :func:`edice_dist.preflight.preflight` checks,
before any work starts, that every input exists and every output location can be
written, so that a job on a cluster fails in seconds with a message rather than after an
hour of ingest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import config, runfolder, stages, storage
from .config import Source, option
from .errors import EdiceError, InputError

PATH_KEYS = ("out", "manifest", "chrom_sizes", "store", "model", "run")
"""Top-level keys that hold a path or URL."""

STAGES = ("simulate", "ingest", "train", "impute", "evaluate")
"""Stages in the order a pipeline runs them; each has a section of its options."""
SECTION_PATHS = {"simulate": ("out",), "evaluate": ("truth", "out")}
"""Path keys of a stage's section, besides its options (the other paths are top-level)."""
OPEN_STAGES = ("simulate", "train")
"""Sections whose values are checked by :func:`edice_dist.preflight.preflight` (they may
read files), not when the config loads."""
GPU_STAGES = ("train", "impute")
DEFAULT_GPU_WAIT_S = 1800

PROBE_CONNECT_TIMEOUT_S = 5
PROBE_READ_TIMEOUT_S = 10


@dataclass(frozen=True)
class ClusterOptions:
    """The ``cluster`` section."""

    gpus: int = option(0, "GPUs to ask the autoscaler for before training or imputation",
                       minimum=0)
    gpu_wait_s: int = option(DEFAULT_GPU_WAIT_S, "how long to wait for them", minimum=1)


# ----------------------------------------------------------------------------- loading


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


def is_targets_file(spec: str) -> bool:
    """A targets TSV (path or URL) rather than a list ``cell:assay,...``."""
    return storage.is_url(spec) or spec.endswith((".tsv", ".txt")) or ":" not in spec


def section_label(path: str, section: str) -> str:
    return f"job config {path}, the {section} section"


def _section(name: str, sec: dict, base: str, path: str) -> dict:
    """One stage's section: keys checked; paths resolved; the options of a closed stage
    typed, with their defaults filled in."""
    where, prefix = section_label(path, name), f"{name}."
    job_paths = SECTION_PATHS.get(name, ())
    stages.check_keys(name, sec, where, prefix, extra=job_paths)
    sec = {k.replace("-", "_"): v for k, v in sec.items()}
    for f in dataclasses.fields(stages.stage(name).options):
        if f.metadata.get("path") and sec.get(f.name) is not None:
            sec[f.name] = _resolve(sec[f.name], prefix + f.name, base, path)
    if name == "impute":
        t = sec.get("targets")
        if isinstance(t, list):
            sec["targets"] = ",".join(str(x) for x in t)
        elif t is not None and not isinstance(t, str):
            raise InputError(
                f"Job config {path}: impute.targets must be a file, a list of cell:assay or a "
                f"string cell:assay,cell:assay, got {t!r}."
            )
        elif isinstance(t, str) and is_targets_file(t):
            sec["targets"] = _resolve(t, "impute.targets", base, path)
    own = {k: sec.pop(k) for k in job_paths if k in sec}
    if name not in OPEN_STAGES:
        sec = dataclasses.asdict(stages.prepare(name, sec, where=where, prefix=prefix,
                                                text=False))
    return {**sec, **{k: _resolve(v, prefix + k, base, path) for k, v in own.items()}}


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
        ``manifest`` and ``chrom_sizes`` default to the simulated ones. The sections of
        ingest, impute, evaluate and cluster hold every option, typed; those of simulate
        and train the keys given (:func:`edice_dist.preflight.preflight` checks them).

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
    raw = config.parse_mapping(text, str(path), "Job config")
    config.check_keys(raw, (*PATH_KEYS, *STAGES, "cluster"), f"job config {path}, the top level")
    base = storage.parent(path) if storage.is_url(path) else os.path.dirname(os.path.abspath(path))
    cfg: dict = {k: _resolve(raw.get(k), k, base, path) for k in PATH_KEYS}

    for name in (*STAGES, "cluster"):
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
        if name == "cluster":
            cfg[name] = dataclasses.asdict(config.load(
                ClusterOptions, Source(sec, section_label(path, name), text=False, prefix="cluster.")))
        else:
            cfg[name] = _section(name, sec, base, path)

    if cfg["simulate"] is not None:
        s = cfg["simulate"]
        if s.get("out") is None:
            if cfg["out"] is None:
                raise InputError(
                    f"Job config {path}: the simulate section needs `out:` (where to write "
                    "the consortium), or set `out:` at the top level."
                )
            s["out"] = storage.join(cfg["out"], "consortium")
        cfg["manifest"] = cfg["manifest"] or storage.join(s["out"], "manifest.tsv")
        cfg["chrom_sizes"] = cfg["chrom_sizes"] or storage.join(s["out"], "chrom.sizes")
    if cfg["evaluate"] is not None:
        s = cfg["evaluate"]
        if s.get("truth") is None and cfg["simulate"] is not None:
            s["truth"] = storage.join(cfg["simulate"]["out"], "truth", "targets.tsv")
        s.setdefault("truth", None)
        if s.get("out") is None and cfg["out"] is not None:
            s["out"] = storage.join(cfg["out"], "evaluation")
        s.setdefault("out", None)
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


def run_stages(cfg: dict, names: Iterable[str]) -> dict:
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

    names = tuple(names)
    done: dict[str, str] = {}
    want_gpus = (cfg.get("cluster") or {}).get("gpus", 0)
    requested = False
    try:
        for i, name in enumerate(names, 1):
            if name in GPU_STAGES and want_gpus and not requested:
                requested = True
                wait_for_gpus(want_gpus, cfg["cluster"]["gpu_wait_s"])
            log(f"=== [{i}/{len(names)}] {name}")
            done[name] = _run_stage(cfg, name)
    finally:
        if requested:
            release_gpus()
    return done


def wait_for_gpus(n: int, timeout_s: float, poll_s: float = 5.0) -> int:
    """Ask the autoscaler for ``n`` GPUs and wait until Ray reports them.

    An autoscaling cluster starts with no GPU node (``min_workers: 0``), and training and
    imputation size themselves from the GPUs Ray reports when they start; so a job asks
    for its GPUs first. Returns the GPUs Ray reports.

    The request is sent again at every poll: the autoscaler keeps one request for the
    whole cluster, the last one sent, and once Ray Train has run on a cluster its detached
    ``AutoscalingCoordinator`` actor sends its own (empty when no training runs) every
    20 s. Sent once, ours could be replaced before the autoscaler had read it, and no
    node would come.

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
    bundles = [{"GPU": 1}] * n
    t0 = last = time.monotonic()
    while True:
        request_resources(bundles=bundles)
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


def stage_paths(cfg: dict, name: str) -> dict[str, str | None]:
    """The paths stage ``name`` reads and writes, from the top level of ``cfg`` and (for
    simulate and evaluate) its section."""
    sec = cfg.get(name) or {}
    return {
        "simulate": lambda: {"out": sec.get("out")},
        "ingest": lambda: {"manifest": cfg["manifest"], "chrom_sizes": cfg["chrom_sizes"],
                           "out": cfg["store"]},
        "train": lambda: {"store": cfg["store"], "out": cfg["model"]},
        "impute": lambda: {"store": cfg["store"], "model": cfg["model"], "out": cfg["run"]},
        "evaluate": lambda: {"truth": sec.get("truth"),
                             "imputed": runfolder.bigwig_dir(cfg["run"]),
                             "store": cfg["store"], "out": sec.get("out")},
    }[name]()


def stage_options(cfg: dict, name: str) -> dict:
    """The options of stage ``name`` in ``cfg`` (its section without its path keys)."""
    sec = cfg.get(name) or {}
    return {k: v for k, v in sec.items() if k not in SECTION_PATHS.get(name, ())}


def _run_stage(cfg: dict, name: str) -> str:
    """Run one stage through the stage runner; return the path it wrote."""
    paths = stage_paths(cfg, name)
    stages.run_stage(name, paths, stage_options(cfg, name),
                     where=section_label(cfg.get("config_path", "?"), name), prefix=f"{name}.",
                     text=False)
    return paths["out"] or ""
