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
against the config file's folder. :func:`preflight` checks, before any work starts, that
every input exists and every output location can be written, so that a job on a
cluster fails in seconds with a message rather than after an hour of ingest.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Iterable

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


# ----------------------------------------------------------------------------- preflight


def _bucket(url: str) -> tuple[str, str, str]:
    """(protocol, bucket, key) of a URL."""
    proto, rest = str(url).split("://", 1)
    bucket, _, key = rest.partition("/")
    return proto, bucket, key.strip("/")


def _s3_client():
    """A botocore client that fails fast: short timeouts, no retries."""
    import botocore.session
    from botocore.config import Config

    opts = storage.storage_options("s3://x").get("client_kwargs", {})
    session = botocore.session.get_session()
    return session.create_client(
        "s3", endpoint_url=opts.get("endpoint_url"), region_name=opts.get("region_name"),
        config=Config(connect_timeout=PROBE_CONNECT_TIMEOUT_S, read_timeout=PROBE_READ_TIMEOUT_S,
                      retries={"max_attempts": 1, "mode": "standard"}),
    )


_ENV_HINT = ("Credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
             "AWS_ENDPOINT_URL and AWS_REGION (or an instance profile / ~/.aws); on a Ray "
             "cluster they must be set on every node or passed in the job's runtime_env "
             "env_vars.")


def _s3_error(e: Exception, what: str) -> str:
    import botocore.exceptions as bx

    endpoint = storage.storage_options("s3://x").get("client_kwargs", {}).get(
        "endpoint_url", "the default AWS S3 endpoint")
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return f"{what}: no S3 credentials were found. {_ENV_HINT}"
    if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError
                  | bx.ConnectionClosedError | bx.ProxyConnectionError | bx.SSLError):
        return (f"{what}: cannot reach the S3 endpoint {endpoint} ({e}). Check AWS_ENDPOINT_URL "
                f"and that the endpoint is reachable from this machine. {_ENV_HINT}")
    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return f"{what}: the bucket does not exist at {endpoint}. Create it or fix the URL."
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken"):
            return (f"{what}: access denied ({code}). The credentials in use cannot access it. "
                    f"{_ENV_HINT}")
        return f"{what}: S3 error {code or ''} ({e}). {_ENV_HINT}"
    return f"{what}: {type(e).__name__}: {e}"


class _Checker:
    """Collects problems; S3 buckets are probed once each, with short timeouts."""

    def __init__(self):
        self.problems: list[str] = []
        self._buckets: dict[tuple[str, str], bool] = {}
        self._client = None

    def add(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)

    # reachability -------------------------------------------------------------------

    def reachable(self, url: str, what: str) -> bool:
        """False (and a problem recorded) when the URL's store cannot be reached."""
        if not storage.is_url(url):
            return True
        proto, bucket, _ = _bucket(url)
        key = (proto, bucket)
        if key in self._buckets:
            return self._buckets[key]
        ok = True
        if proto in ("s3", "s3a"):
            try:
                if self._client is None:
                    self._client = _s3_client()
                self._client.head_bucket(Bucket=bucket)
            except Exception as e:
                import botocore.exceptions as bx

                code = ""
                if isinstance(e, bx.ClientError):
                    code = str(e.response.get("Error", {}).get("Code", ""))
                # 403 on HEAD bucket also means "may read objects but not list the bucket":
                # the object-level checks that follow give the precise answer.
                if code not in ("403", "AccessDenied"):
                    self.add(_s3_error(e, f"{what} {url} (bucket s3://{bucket})"))
                    ok = False
        else:
            try:
                storage.filesystem(url)
            except (ImportError, ValueError) as e:
                self.add(f"{what} {url}: no filesystem for {proto}:// ({e}). Install the "
                         f"fsspec package for {proto} (e.g. gcsfs for gs://, adlfs for az://).")
                ok = False
        self._buckets[key] = ok
        return ok

    # inputs ---------------------------------------------------------------------------

    def file_exists(self, path: str | None, what: str, hint: str) -> bool:
        if path is None:
            return False
        if not self.reachable(path, what):
            return False
        try:
            fs, p = storage.filesystem(path)
            if fs.isfile(p):
                return True
            if fs.isdir(p):
                self.add(f"{what} {path} is a folder, not a file. {hint}")
                return False
        except PermissionError as e:
            self.add(f"{what} {path} cannot be read: permission denied ({e}). {_ENV_HINT}")
            return False
        except Exception as e:  # network/permission errors of any fsspec backend
            self.add(f"{what} {path} cannot be checked: {type(e).__name__}: {e}. {_ENV_HINT}")
            return False
        self.add(f"{what} {path} does not exist. {hint}")
        return False

    def files_exist(self, paths: list[str], what: str, hint: str) -> None:
        """Many files (the bigWigs of a manifest): one listing per folder, not one
        request per file."""
        by_dir: dict[str, list[str]] = {}
        for p in paths:
            by_dir.setdefault(storage.parent(p), []).append(p)
        missing: list[str] = []
        for folder, files in by_dir.items():
            if not self.reachable(folder, what):
                continue
            try:
                fs, inner = storage.filesystem(folder)
                listing = {x.rstrip("/") for x in fs.ls(inner, detail=False)} if fs.isdir(inner) else set()
                for f in files:
                    _, fp = storage.filesystem(f)
                    if fp.rstrip("/") not in listing and not fs.isfile(fp):
                        missing.append(f)
            except PermissionError as e:
                self.add(f"{what} in {folder} cannot be read: permission denied ({e}). {_ENV_HINT}")
            except Exception as e:
                self.add(f"{what} in {folder} cannot be checked: {type(e).__name__}: {e}. {_ENV_HINT}")
        if missing:
            show = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            self.add(f"{len(missing)} of the {len(paths)} {what} listed in the manifest do not "
                     f"exist: {show}. {hint}")

    def parse(self, fn: Callable, path: str) -> object | None:
        """Run a validating reader; record its message instead of raising."""
        try:
            return fn()
        except EdiceError as e:
            self.add(str(e))
        except PermissionError as e:
            self.add(f"{path} cannot be read: permission denied ({e}). {_ENV_HINT}")
        except Exception as e:
            self.add(f"{path} cannot be read: {type(e).__name__}: {e}.")
        return None

    # outputs --------------------------------------------------------------------------

    def writable(self, path: str | None, what: str) -> None:
        if path is None:
            return
        if storage.is_url(path):
            if not self.reachable(path, what):
                return
            proto, bucket, key = _bucket(path)
            probe_key = (key.rstrip("/") + "." if key else "") + f"edice-preflight-{uuid.uuid4().hex}"
            if proto in ("s3", "s3a"):
                try:
                    self._client.put_object(Bucket=bucket, Key=probe_key, Body=b"")
                    self._client.delete_object(Bucket=bucket, Key=probe_key)
                except Exception as e:
                    self.add(_s3_error(e, f"{what} {path} is not writable"))
                return
            probe = f"{proto}://{bucket}/{probe_key}"
            try:
                storage.write_bytes_atomic(probe, b"")
                storage.remove(probe)
            except Exception as e:
                self.add(f"{what} {path} is not writable: {type(e).__name__}: {e}.")
            return
        p = os.path.abspath(path)
        if os.path.isfile(p):
            self.add(f"{what} {path} is an existing file; it must be a folder. Choose another path.")
            return
        anc = p
        while not os.path.exists(anc):
            nxt = os.path.dirname(anc)
            if nxt == anc:
                break
            anc = nxt
        if not os.path.isdir(anc):
            self.add(f"{what} {path} cannot be created: {anc} is a file, not a folder.")
        elif not os.access(anc, os.W_OK | os.X_OK):
            self.add(f"{what} {path} cannot be created: no write permission in {anc}. "
                     "Choose a writable location.")


def preflight(cfg: dict, stages: Iterable[str] = ("ingest", "train", "impute")) -> None:
    """Check, before any work, everything the given stages will read and write.

    Inputs must exist (manifest and chrom sizes are parsed and validated, every bigWig
    listed in the manifest must exist, a store must open as a track store, a model
    folder must hold ``model.pt``); an input that an earlier stage in ``stages``
    produces is not checked. Output locations must be writable: for URLs the bucket is
    probed with short timeouts and a small object is written and deleted; for local
    paths the nearest existing folder must be writable.

    Parameters
    ----------
    cfg : dict
        A config from :func:`load_job_config`.
    stages : iterable of str
        Stages that will run, among ``simulate``, ``ingest``, ``train``, ``impute``,
        ``evaluate``.

    Raises
    ------
    EdiceError
        Listing every problem found, each with the path and what to do.
    """
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
    src = cfg.get("config_path", "the job config")
    chk = _Checker()

    def need(key: str, stage: str) -> str | None:
        if cfg.get(key) is None:
            chk.add(f"The {stage} stage needs `{key}:` in {src} (or `out:` for store, model "
                    "and run).")
        return cfg.get(key)

    made = set()
    if "simulate" in stages:
        from .simulate import SimConfig

        sim = {k: str(v) for k, v in cfg["simulate"].items() if k != "out" and v is not None}
        chk.parse(lambda: SimConfig.from_overrides(sim), "the simulate section")
        chk.writable(cfg["simulate"]["out"], "Simulation output folder")
        made |= {"manifest", "chrom_sizes"}
    if "ingest" in stages:
        manifest, sizes = need("manifest", "ingest"), need("chrom_sizes", "ingest")
        opts = cfg.get("ingest") or {}
        if "manifest" not in made and manifest and chk.file_exists(
                manifest, "Manifest", "Point `manifest:` at a TSV with cell_type, assay, path."):
            from .tracks import read_manifest

            tracks = chk.parse(lambda: read_manifest(manifest), manifest)
            if tracks:
                chk.files_exist([t.path for t in tracks], "bigWig files",
                                "Fix the paths in the manifest (relative paths resolve "
                                "against the manifest's folder) or upload the files.")
        if "chrom_sizes" not in made and sizes and chk.file_exists(
                sizes, "Chromosome sizes file", "Point `chrom_sizes:` at a two-column chrom.sizes file."):
            from .genome import read_chrom_sizes

            chk.parse(lambda: read_chrom_sizes(sizes, opts.get("chroms")), sizes)
        chk.writable(need("store", "ingest"), "Store location")
        made.add("store")
    if "train" in stages:
        store, model = need("store", "train"), need("model", "train")
        if "store" not in made and store:
            _check_store(chk, store)
        opts = cfg.get("train") or {}
        if not opts.get("config_file") or chk.file_exists(
                opts["config_file"], "Training config file", "Fix train.config_file or remove it."):
            from .train import load_config

            # Bad training settings fail now, not after an ingest of hours.
            chk.parse(lambda: load_config(opts.get("config_file"), _train_overrides(opts)),
                      "the train section")
        chk.writable(model, "Model folder")
        made.add("model")
    if "impute" in stages:
        store, model, run = need("store", "impute"), need("model", "impute"), need("run", "impute")
        if "store" not in made and store:
            _check_store(chk, store)
        if "model" not in made and model:
            chk.file_exists(storage.join(model, "model.pt"), "Trained model",
                            f"Train one into {model} first (jobs/train.py), or fix `model:`.")
        targets = (cfg.get("impute") or {}).get("targets")
        if targets and _is_targets_file(targets):
            chk.file_exists(targets, "Targets file",
                            "impute.targets is a TSV with cell_type and assay, or cell:assay,...")
        chk.writable(run, "Run folder")
        made.add("run")
    if "evaluate" in stages:
        opts = cfg.get("evaluate") or {}
        if not opts.get("truth"):
            chk.add(f"The evaluate stage needs `evaluate: {{truth: ...}}` in {src} (the "
                    "manifest of held-out truth tracks), or a simulate section.")
        elif "simulate" not in stages:
            chk.file_exists(opts["truth"], "Truth manifest", "Fix evaluate.truth.")
        if "run" not in made and cfg.get("run"):
            chk.file_exists(storage.join(cfg["run"], "bigwig", "manifest.tsv"), "Imputed bigWigs",
                            "Run the impute stage first.")
        chk.writable(opts.get("out"), "Evaluation folder")
    if chk.problems:
        lines = "\n".join(f"  - {p}" for p in chk.problems)
        raise EdiceError(
            f"The job config {src} cannot run ({', '.join(stages)}); nothing was started. "
            f"{len(chk.problems)} problem(s):\n{lines}"
        )


def _check_store(chk: _Checker, store: str) -> None:
    if not chk.reachable(store, "Track store"):
        return
    from .store import open_store

    chk.parse(lambda: open_store(store), store)


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
