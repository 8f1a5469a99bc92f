"""Checks a job config before any work starts: every input exists, every output location
can be written (for S3: the bucket exists and the credentials may write to it, probed
with short timeouts and no retries), so that a job on a cluster fails in seconds with
one message listing every problem rather than after an hour of ingest."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable

from . import runfolder, storage
from . import stages as stages_mod
from .errors import S3_HINT as _ENV_HINT
from .errors import EdiceError
from .errors import s3_error_text as _s3_error
from .jobconfig import (
    PROBE_CONNECT_TIMEOUT_S,
    PROBE_READ_TIMEOUT_S,
    STAGES,
    is_targets_file,
    section_label,
    stage_options,
)


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
    def settings(stage: str) -> None:
        """The stage's options as the stage runner will take them (files read too)."""
        chk.parse(lambda: stages_mod.prepare(stage, stage_options(cfg, stage),
                                             where=section_label(src, stage),
                                             prefix=f"{stage}.", text=False),
                  f"the {stage} section")

    if "simulate" in stages:
        settings("simulate")
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
            settings("train")  # bad training settings fail now, not after an ingest of hours
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
        if targets and is_targets_file(targets):
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
            chk.file_exists(storage.join(runfolder.bigwig_dir(cfg["run"]),
                                         runfolder.BIGWIG_MANIFEST),
                            "Imputed bigWigs", "Run the impute stage first.")
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
