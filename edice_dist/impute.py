"""Genome-wide imputation: a chunk plan, a pool of Ray actors, done markers and resume.

```
RUN_DIR/
  run.json            what the run is (store and model fingerprints, targets, chroms, ...)
  imputed.zarr/       Zarr v3 group, one array per chromosome: (n_targets, n_bins),
                      arcsinh(-log10 p); float16 when computed in bf16 (its rounding is
                      well below bf16's), float32 when computed in float32; written as
                      imputed.zarr.partial, then renamed
  bigwig/             one bigWig per target and manifest.tsv (edice_dist.export)
```

The driver plans one work unit per store chunk (all chromosomes) and hands them to a
pool of actors, each pinned to one GPU (``num_gpus=1``) where Ray has GPUs and using
CPU threads otherwise. Each actor loads the model once, reads its chunk's support
tracks from the store itself, predicts every target (:mod:`edice_dist.predict`) and
writes one whole shard of the output, then its done marker. No bulk data passes through
the driver or the object store. While a chunk computes, the actor reads the next one
and writes the previous one in background threads; a call returns the chunks whose
writes (and markers) completed, and only those count as done. A dead actor is replaced
and everything it had not confirmed is redone; a re-run skips chunks with markers.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import os
import resource
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import __version__, storage
from ._partial import check_complete, done_set, finalise, mark_done, partial_path
from .errors import EdiceError, InputError
from .genome import Chunk
from .progress import Progress, log, stage
from .tracks import cell_key as make_cell_key
from .tracks import parse_targets, track_id

RUN_FORMAT = "edice-imputation-run"
OUTPUT_FORMAT = "edice-imputation"
FORMAT_VERSION = 1
OUTPUT_NAME = "imputed.zarr"
SUPPORT_SPLITS = ("train", "val")  # test tracks are never supports (ARCHITECTURE.md)
MAX_ATTEMPTS = 3  # failures of one chunk before the run gives up
# CPU actors are single-threaded by default: two 1-thread actors imputed 1.5-3x faster
# than one 2-thread actor on the 2-core reference box (benchmarks/bench_impute.py).
CPU_THREADS_PER_ACTOR = 1
# Run settings that must match to resume a run folder (the rest is informational).
_COMPAT = ("store_fingerprint", "model_sha256", "targets", "chroms", "chunk_bins")


# -- inputs: targets, supports, fingerprints ----------------------------------------------


def _near(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def resolve_targets(spec, store, meta: dict) -> list[tuple[str, str]]:
    """The run's targets as (cell_key, assay) pairs, in a stable order.

    Parameters
    ----------
    spec : None, str or list of (cell_key, assay)
        None: every pair of the model's vocabulary with no support track in the store
        (test-split tracks count as unobserved, so they are imputed for evaluation).
        A str is a targets TSV or ``cell:assay,cell:assay`` (:func:`tracks.parse_targets`).
        Observed pairs may be listed (quality control: they are predicted from all
        supports, themselves included).

    Raises
    ------
    InputError
        A target's cell or assay is not in the model's vocabulary (the message lists the
        valid names and the nearest ones), or no target is left.
    """
    cells, assays = list(meta["cell_keys"]), list(meta["assays"])
    if spec is None:
        observed = {(t.cell_key, t.assay) for t in store.tracks if t.split in SUPPORT_SPLITS}
        pairs = [(c, a) for c in cells for a in assays if (c, a) not in observed]
        if not pairs:
            raise InputError(
                f"Store {store.path} observes every (cell type, assay) pair of the model's "
                "vocabulary, so there is nothing to impute. Name targets with --targets "
                "(observed pairs are allowed, for quality control)."
            )
        return pairs
    pairs = parse_targets(spec) if isinstance(spec, str) else [tuple(p) for p in spec]
    bad = []
    for c, a in pairs:
        if c not in cells:
            bad.append(f"cell type {c!r} (target {c}:{a}{_near(c, cells)})")
        if a not in assays:
            bad.append(f"assay {a!r} (target {c}:{a}{_near(a, assays)})")
    if bad:
        raise InputError(
            f"{len(bad)} target name(s) are not in the model's vocabulary: {'; '.join(bad[:6])}"
            f"{'; ...' if len(bad) > 6 else ''}. The model knows the cell types "
            f"{', '.join(cells[:20])}{', ...' if len(cells) > 20 else ''} and the assays "
            f"{', '.join(assays)}. A model can only impute pairs of its vocabulary."
        )
    seen, out = set(), []
    for p in pairs:  # duplicates would give two writers the same bigWig
        if p not in seen:
            seen.add(p)
            out.append(p)
    if not out:
        raise InputError("The target list is empty.")
    return out


def select_supports(store, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store columns used as supports and their vocabulary indices.

    Returns
    -------
    cols : (S,) int64, store columns of train/val tracks whose cell and assay the model knows.
    cells, assays : (S,) int64, their indices in the model's vocabulary.

    Raises
    ------
    InputError
        The store's value transform is not the model's, or no store track maps into the
        model's vocabulary.
    """
    if store.transform != meta.get("transform"):
        raise InputError(
            f"Store {store.path} holds values transformed by {store.transform!r} but the model "
            f"was trained on {meta.get('transform')!r} values. Re-ingest the tracks the way "
            "the model's training store was built, or use a model trained on this store."
        )
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    cols = [i for i, t in enumerate(store.tracks)
            if t.split in SUPPORT_SPLITS and t.cell_key in ci and t.assay in ai]
    if not cols:
        raise InputError(
            f"No train/val track of store {store.path} has a cell type and an assay of the "
            f"model's vocabulary (store: {', '.join(store.cell_keys[:8])} x "
            f"{', '.join(store.assays[:8])}; model: {', '.join(meta['cell_keys'][:8])} x "
            f"{', '.join(meta['assays'][:8])}), so there is nothing to impute from. Use a "
            "model trained on a consortium that shares cell types and assays with this store."
        )
    cols = np.array(cols, dtype=np.int64)
    cells = np.array([ci[store.tracks[i].cell_key] for i in cols], dtype=np.int64)
    assays = np.array([ai[store.tracks[i].assay] for i in cols], dtype=np.int64)
    return cols, cells, assays


def store_fingerprint(store) -> str:
    """sha256 of the store's root attributes (tracks, chromosomes, creation time)."""
    return hashlib.sha256(json.dumps(store.attrs, sort_keys=True, default=str).encode()).hexdigest()


def model_sha256(model_dir: str) -> str:
    h = hashlib.sha256()
    h.update(storage.read_bytes(storage.join(model_dir, "model.pt")))
    return h.hexdigest()


def split_cell_key(key: str) -> tuple[str, str]:
    """``cell_type@individual`` -> (cell_type, individual); plain cell types -> (key, '')."""
    cell, _, ind = key.partition("@")
    return cell, ind


def target_records(targets: list[tuple[str, str]], store) -> list[dict]:
    observed = {(t.cell_key, t.assay): t.split for t in store.tracks}
    out = []
    for c, a in targets:
        cell, ind = split_cell_key(c)
        out.append({"cell_key": c, "assay": a, "cell_type": cell, "individual": ind,
                    "track_id": track_id(make_cell_key(cell, ind), a),
                    "observed": observed.get((c, a), "")})
    return out


# -- actors -------------------------------------------------------------------------------


def pool_shape(n_cpus: int, n_gpus: int, workers: int | None = None, gpus: int | None = None,
               node_cpus: int | None = None, autoscaling: bool = False) -> tuple[int, dict, int]:
    """Size the actor pool from what Ray reports.

    Parameters
    ----------
    n_cpus, n_gpus : resources of the cluster.
    workers : actors wanted (default: one per GPU; on CPU, one actor of
        ``CPU_THREADS_PER_ACTOR`` threads per that many CPUs); on CPU the actors share the
        CPUs evenly.
    gpus : GPUs to use (default: all); 0 forces CPU actors.
    node_cpus : CPUs of the largest node (default ``n_cpus``): a CPU actor never asks more.
    autoscaling : the cluster may add nodes (a submitted job): GPUs beyond those up now are
        requested from the autoscaler instead of refused.

    Returns
    -------
    (n_actors, ray options, torch threads per actor)
    """
    node_cpus = node_cpus or n_cpus
    use = n_gpus if gpus is None else gpus
    if use < 0 or (workers is not None and workers < 1):
        raise InputError("--gpus must be >= 0 and --workers >= 1.")
    if use > n_gpus and not autoscaling:
        raise InputError(
            f"--gpus {use} asks for more GPUs than the Ray cluster has ({n_gpus}). Use "
            f"--gpus {n_gpus}, or leave it out to use every GPU."
        )
    if use > 0:
        n = use if workers is None else min(workers, use)
        threads = max(1, min(4, n_cpus // max(n, 1)))
        # One CPU each, not ``threads``: the GPU does the work, and held CPUs would starve
        # the export tasks that follow on small nodes.
        return n, {"num_gpus": 1, "num_cpus": 1}, threads
    if workers is None:
        threads = max(1, min(CPU_THREADS_PER_ACTOR, node_cpus))
        n = max(1, n_cpus // threads)
    else:
        n = min(workers, max(1, n_cpus))
        threads = max(1, min(node_cpus, n_cpus // n))
    return n, {"num_gpus": 0, "num_cpus": threads}, threads


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@dataclass
class WorkerSpec:
    """What every actor needs; small and picklable (no data)."""

    model_dir: str
    store_path: str
    out_path: str  # the .partial output group
    support_cols: np.ndarray
    support_cells: np.ndarray
    support_assays: np.ndarray
    target_cells: np.ndarray
    target_assays: np.ndarray
    array_keys: dict  # chrom -> array key
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    batch_bins: int | None = None
    hooks: dict = field(default_factory=dict)


class ChunkWorker:
    """One imputation actor: model loaded once, reads/computes/writes whole chunks."""

    def __init__(self, spec: WorkerSpec):
        import torch
        import zarr

        from .checkpoint import load_model
        from .predict import prepare, resolve_device
        from .store import open_store

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        device = resolve_device(spec.device)
        model, _ = load_model(spec.model_dir, device)
        self.pred = prepare(model, device, spec.dtype)
        self.store = open_store(spec.store_path)
        # Each write covers whole shards: skip zarr's per-chunk "is it all fill value?"
        # scan (2.5x faster writes, benchmarks/bench_impute.py).
        zarr.config.set({"array.write_empty_chunks": True})
        self.out = zarr.open_group(storage.zarr_store(spec.out_path), mode="r+")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="edice-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="edice-write")
        self._prefetch: tuple[Chunk, object] | None = None
        self._write: tuple[Chunk, object] | None = None
        self.n_computed = 0
        self.compute_s = 0.0
        self.read_wait_s = 0.0

    def _read(self, chunk: Chunk) -> np.ndarray:
        return self.store.read(chunk.chrom, chunk.start, chunk.stop, columns=self.spec.support_cols)

    def _write_chunk(self, chunk: Chunk, y: np.ndarray) -> None:
        key = self.spec.array_keys[chunk.chrom]
        self.out[key][:, chunk.start:chunk.stop] = y
        mark_done(self.spec.out_path, key, chunk.index)  # only after the data is written

    def _finish_write(self) -> list[tuple[str, int]]:
        if self._write is None:
            return []
        chunk, fut = self._write
        self._write = None
        fut.result()  # re-raises a failed write: the driver then redoes the chunk
        return [(chunk.chrom, chunk.index)]

    def _hooks(self, chunk: Chunk) -> None:
        die = self.spec.hooks.get("die_on")
        if die and (chunk.chrom, chunk.index) == tuple(die):
            marker = self.spec.hooks["die_marker"]
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(f"{chunk.chrom}\t{chunk.index}\n")
                os._exit(1)

    def compute(self, chunk: Chunk, next_chunk: Chunk | None = None) -> list[tuple[str, int]]:
        """Predict ``chunk`` and start its write; prefetch ``next_chunk``.

        Returns
        -------
        list of (chrom, index)
            Chunks whose data and done marker are now written (the previous one).
        """
        from .predict import predict_chunk

        self._hooks(chunk)
        t0 = time.perf_counter()
        if self._prefetch is not None and self._prefetch[0] == chunk:
            x = self._prefetch[1].result()
        else:
            x = self._read(chunk)
        self._prefetch = None
        self.read_wait_s += time.perf_counter() - t0
        if next_chunk is not None:
            self._prefetch = (next_chunk, self._reader.submit(self._read, next_chunk))
        t1 = time.perf_counter()
        S = len(self.spec.support_cols)
        y = predict_chunk(self.pred, x, np.arange(S), self.spec.support_cells,
                          self.spec.support_assays, self.spec.target_cells,
                          self.spec.target_assays, batch_bins=self.spec.batch_bins)
        self.compute_s += time.perf_counter() - t1
        self.n_computed += 1
        log_path = self.spec.hooks.get("log")
        if log_path:
            with open(log_path, "a") as f:  # one short O_APPEND write per line
                f.write(f"{chunk.chrom}\t{chunk.index}\n")
        done = self._finish_write()
        self._write = (chunk, self._writer.submit(self._write_chunk, chunk, y))
        return done

    def where(self) -> tuple[int, str]:
        """(pid, Ray node id) of this actor's process."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def flush(self) -> list[tuple[str, int]]:
        """Wait for the last write; returns the chunks it completes."""
        return self._finish_write()

    def stats(self) -> dict:
        import torch

        return {"pid": os.getpid(), "peak_rss_mib": _peak_rss_mib(), "chunks": self.n_computed,
                "threads": torch.get_num_threads(), "compiled": self.pred.compiled,
                "compute_s": self.compute_s, "read_wait_s": self.read_wait_s,
                "device": str(self.pred.device), "dtype": str(self.pred.dtype).replace("torch.", "")}


# -- the driver ---------------------------------------------------------------------------


@dataclass
class _Slot:
    """One actor and the chunks it owns: the one computing, the reserved next one, and
    the computed ones whose writes it has not confirmed yet."""

    handle: object = None
    where: object = None  # ref to (pid, node id), asked for first so that it answers early
    cur: Chunk | None = None
    nxt: Chunk | None = None
    unconfirmed: list = field(default_factory=list)
    ref: object = None
    flushing: bool = False


def _run_pool(spec: WorkerSpec, todo: list[Chunk], n_actors: int, options: dict,
              progress: Progress, hooks: dict) -> dict:
    """Compute every chunk of ``todo``; returns pool statistics. Kills its actors on exit."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    Worker = ray.remote(ChunkWorker).options(max_restarts=0, max_task_retries=0, **options)
    pending = deque(todo)
    attempts: dict[tuple[str, int], int] = {}
    def new_slot() -> _Slot:
        h = Worker.remote(spec)
        return _Slot(handle=h, where=h.where.remote())

    slots = [new_slot() for _ in range(min(n_actors, len(todo)))]
    by_ref: dict = {}
    stats = {"actor_failures": 0, "actors": []}
    confirmed = 0
    stop_after = hooks.get("stop_after")

    def submit(i: int) -> None:
        s = slots[i]
        if s.cur is None:
            s.cur, s.nxt = (s.nxt, None) if s.nxt is not None else (
                pending.popleft() if pending else None, None)
        if s.cur is not None:
            if s.nxt is None and pending:
                s.nxt = pending.popleft()
            s.ref = s.handle.compute.remote(s.cur, s.nxt)
            s.flushing = False
        elif s.unconfirmed:
            s.ref = s.handle.flush.remote()
            s.flushing = True
        else:
            s.ref = None
            return
        by_ref[s.ref] = i

    def fail(i: int, err: Exception) -> None:
        s = slots[i]
        stats["actor_failures"] += 1
        lost = s.unconfirmed + [c for c in (s.cur, s.nxt) if c is not None]
        for c in lost:
            attempts[(c.chrom, c.index)] = attempts.get((c.chrom, c.index), 0) + 1
        worst = max(lost, key=lambda c: attempts[(c.chrom, c.index)], default=None)
        if worst is not None and attempts[(worst.chrom, worst.index)] >= MAX_ATTEMPTS:
            raise EdiceError(
                f"Imputation of {worst.chrom} bins {worst.start}-{worst.stop} (chunk "
                f"{worst.index}) failed {MAX_ATTEMPTS} times; last error: {err}. Fix the cause "
                "and run the same command again: finished chunks are kept."
            )
        log(f"imputation actor failed ({type(err).__name__}); replacing it and redoing "
            f"{len(lost)} chunk(s)")
        for c in reversed(lost):
            pending.appendleft(c)
        _kill_and_wait([s])
        slots[i] = new_slot()

    try:
        for i in range(len(slots)):
            submit(i)
        while by_ref:
            ready, _ = ray.wait(list(by_ref), num_returns=1)
            i = by_ref.pop(ready[0])
            s = slots[i]
            try:
                done = ray.get(ready[0])
            except RayTaskError as e:
                if isinstance(e.cause, EdiceError):
                    raise e.cause from None
                fail(i, e)
                done = None
            except RayActorError as e:
                fail(i, e)
                done = None
            if done is not None:
                if not s.flushing:
                    s.unconfirmed.append(s.cur)
                    s.cur = None
                keys = {tuple(k) for k in done}
                s.unconfirmed = [c for c in s.unconfirmed if (c.chrom, c.index) not in keys]
                confirmed += len(keys)
                progress.update(len(keys))
                if stop_after is not None and confirmed >= stop_after:
                    raise EdiceError(f"stopped after {confirmed} chunks (test hook)")
            submit(i)
            for j, sj in enumerate(slots):  # idle actors take chunks a failed one gave back
                if j != i and sj.ref is None and pending:
                    submit(j)
        try:
            stats["actors"] = ray.get([s.handle.stats.remote() for s in slots], timeout=60)
        except Exception as e:  # noqa: BLE001 - statistics only; the chunks are all done
            log(f"could not collect actor statistics ({type(e).__name__})")
    finally:
        _kill_and_wait(slots)
    return stats


def _kill_and_wait(slots: list[_Slot], timeout: float = 30.0) -> None:
    """Kill actors and wait until their processes are gone, so that no write of theirs
    lands after the driver has moved on (a re-run must not race a dying writer).

    Ray reports an actor dead before its process has exited; on this node the process
    itself is awaited. (A late write on another node is harmless: a marker is only ever
    written after its chunk's data, and a rewrite writes the same values.)
    """
    import ray

    here = ray.get_runtime_context().get_node_id()
    procs = []
    for s in slots:
        try:
            procs.append(ray.get(s.where, timeout=0.5))
        except Exception:  # noqa: BLE001 - never started, or already dead
            pass
        ray.kill(s.handle, no_restart=True)
    deadline = time.monotonic() + timeout
    for pid, node in procs:
        if node != here:
            continue
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone (or the pid was reused by another user)
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_run(run_dir: str) -> dict | None:
    path = storage.join(run_dir, "run.json")
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a readable run description ({e}). Re-run with --force "
                         "to start this run over.") from None


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for k in _COMPAT:
        if old.get(k) != new.get(k):
            if k == "targets":
                o = {(t["cell_key"], t["assay"]) for t in old.get(k) or []}
                n = {(t["cell_key"], t["assay"]) for t in new[k]}
                out.append(f"targets ({len(o)} before, {len(n)} now; {len(n - o)} added, "
                           f"{len(o - n)} removed)")
            elif k == "model_sha256":
                out.append(f"model ({old.get('model')} sha256 {str(old.get(k))[:12]} -> "
                           f"{new['model']} sha256 {new[k][:12]})")
            elif k == "store_fingerprint":
                out.append(f"store ({old.get('store')} -> {new['store']}, contents differ)")
            else:
                out.append(f"{k} ({old.get(k)} -> {new[k]})")
    return out


def _wipe_run(run_dir: str) -> None:
    """Remove what a run writes, and nothing else in the folder."""
    for name in ("bigwig", OUTPUT_NAME, partial_path(OUTPUT_NAME), "run.json"):
        storage.remove(storage.join(run_dir, name))


def create_output(path: str, store, chroms: list[str], targets: list[dict], chunk_bins: int,
                  attrs: dict, dtype: str = "float32"):
    """Create the output group at ``path`` (a ``.partial`` folder): one ``dtype`` array per
    chromosome, shape (n_targets, n_bins), filled with NaN until computed.

    Each shard is (n_targets, chunk_bins), owned by one writer; its inner chunks are
    (1, chunk_bins) so that the reducer reads one target without decoding the others.
    """
    import zarr

    K = len(targets)
    root = zarr.open_group(storage.zarr_store(path), mode="w", zarr_format=3)
    meta = []
    for c in store.attrs["chroms"]:
        if c["name"] not in chroms:
            continue
        nb = int(c["n_bins"])
        cb = min(chunk_bins, max(nb, 1))
        root.create_array(c["array"], shape=(K, nb), chunks=(1, cb), shards=(K, cb),
                          dtype=dtype, fill_value=float("nan"), compressors=None,
                          dimension_names=("target", "bin"), write_data=False)
        meta.append({"name": c["name"], "size": int(c["size"]), "n_bins": nb, "array": c["array"]})
    root.attrs.update({"format": OUTPUT_FORMAT, "format_version": FORMAT_VERSION,
                       "tool": "edice-dist", "tool_version": __version__,
                       "targets": targets, "transform": "arcsinh",
                       "value_space": "arcsinh(-log10 p), model output per 25 bp bin",
                       "bin_size": store.genome.bin_size, "chunk_bins": chunk_bins,
                       "chroms": meta, **attrs})
    return root


def compute_dtype(dtype: str | None, gpu: bool) -> str:
    """The decoder dtype the actors use: ``dtype`` as given, else bf16 on GPUs and on CPUs
    with native bf16 (as this machine's, assumed alike across the cluster), else float32."""
    import torch

    from .predict import resolve_dtype

    dev = torch.device("cuda" if gpu else "cpu")
    try:
        dt = resolve_dtype(dev, dtype)
    except ValueError as e:
        raise InputError(f"--dtype: {e}.") from None
    return str(dt).replace("torch.", "")


def impute(store: str, model: str, out: str, targets=None, chroms: list[str] | None = None,
           force: bool = False, workers: int | None = None, gpus: int | None = None,
           space: str = "pval", export: bool = True, batch_bins: int | None = None,
           dtype: str | None = None, _hooks: dict | None = None) -> dict:
    """``edice impute``: predict every target over the genome, then export bigWigs.

    Parameters
    ----------
    store, model, out : the track store, the model folder and the run folder (paths or URLs).
    targets : None (every unobserved pair of the model's vocabulary), a targets TSV, a list
        ``cell:assay,...`` or a list of (cell_key, assay) pairs.
    chroms : chromosomes to impute (default: all of the store's, in its order).
    force : start the run over when ``out`` holds a run with other settings.
    workers, gpus : actor pool size (see :func:`pool_shape`).
    space : bigWig values, ``pval`` (-log10 p) or ``arcsinh``.
    export : write the bigWigs at the end.
    batch_bins : bins per forward batch (default: sized from the number of targets).
    dtype : decoder compute dtype, ``float32`` or ``bfloat16`` (default: see
        :func:`compute_dtype`); it also sets the output store's dtype (float32 or float16).

    Returns
    -------
    dict
        Summary: ``tracks``, ``bins``, ``target_bins``, ``chunks_total``, ``chunks_computed``,
        ``chunks_skipped``, ``seconds``, ``target_bins_per_s``, ``actor_failures``,
        ``peak_actor_rss_mib``, ``export`` (the export summary, when run).
    """
    from .checkpoint import load_meta
    from .store import open_store

    if space not in ("pval", "arcsinh"):
        raise InputError(f"--space must be pval or arcsinh, got {space!r}.")
    # Actors may run in another working directory (cluster jobs): pass absolute paths.
    store, model, out = (p if storage.is_url(p) else os.path.abspath(p) for p in (store, model, out))
    hooks = dict(_hooks or {})
    t0 = time.monotonic()
    n_stages = 3 if export else 2
    stage(1, n_stages, f"plan: store {store}, model {model}, run folder {out}")
    st = open_store(store)
    meta = load_meta(model)
    targets_l = resolve_targets(targets, st, meta)
    cols, cells, assays = select_supports(st, meta)
    chrom_list = list(st.genome.subset(chroms).chroms)
    plan = st.chunks(chrom_list)
    recs = target_records(targets_l, st)
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    info = {
        "format": RUN_FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
        "store": store, "store_fingerprint": store_fingerprint(st),
        "model": model, "model_sha256": model_sha256(model),
        "targets": recs, "chroms": chrom_list, "chunk_bins": st.chunk_bins,
        "n_chunks": len(plan), "bins": sum(c.n_bins for c in plan),
        "supports": [st.tracks[i].track_id for i in cols], "transform": st.transform,
    }

    old = _read_run(out)
    final, part = storage.join(out, OUTPUT_NAME), storage.join(out, partial_path(OUTPUT_NAME))
    if old is not None:
        diff = _differences(old, info)
        if diff and not force:
            raise InputError(
                f"Run folder {out} holds a run with other settings: {'; '.join(diff)}. "
                "Use another --out, or add --force to discard that run and start over."
            )
        if force:
            log(f"--force: discarding the run in {out}")
            _wipe_run(out)
            old = None
    elif storage.exists(part) or storage.exists(final):
        _wipe_run(out)  # output without its run.json: unknown settings, start over

    array_keys = {c: st.array_key(c) for c in chrom_list}
    n_bins_total = info["bins"]
    K = len(recs)
    summary = {"tracks": K, "bins": n_bins_total, "target_bins": K * n_bins_total,
               "chunks_total": len(plan), "chunks_computed": 0, "chunks_skipped": len(plan),
               "actor_failures": 0, "peak_actor_rss_mib": None}
    computed_bins = 0
    if old is not None and storage.exists(final):
        log(f"imputation already complete in {final}; {len(plan)} chunks")
    else:
        import ray

        from . import raycluster

        fresh = old is None or not storage.exists(part)
        have = set() if fresh else done_set(part)
        todo = [c for c in plan if (array_keys[c.chrom], c.index) not in have]
        summary["chunks_skipped"] = len(plan) - len(todo)
        summary["chunks_computed"] = len(todo)
        computed_bins = sum(c.n_bins for c in todo)
        if todo:
            raycluster.init()
            node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]),
                            default=1)
            n_actors, options, threads = pool_shape(
                raycluster.cpu_slots(), raycluster.gpu_count(), workers, gpus, node_cpus,
                autoscaling=bool(os.environ.get("RAY_ADDRESS")))
            compute_dt = compute_dtype(dtype, gpu=options["num_gpus"] > 0)
            if fresh:
                # Storage matches the compute precision: float16 holds bf16 results with
                # room to spare (BENCHMARKS.md, "Imputation"); float32 results stay exact.
                out_dt = "float16" if compute_dt == "bfloat16" else "float32"
                storage.makedirs(out)
                storage.write_text_atomic(storage.join(out, "run.json"), json.dumps(
                    {**info, "created": _now(), "dtype": compute_dt, "output_dtype": out_dt},
                    indent=2) + "\n")
                create_output(part, st, chrom_list, recs, st.chunk_bins,
                              {"store": store, "model": model, "model_sha256": info["model_sha256"]},
                              dtype=out_dt)
            elif old.get("dtype") not in (None, compute_dt):
                log(f"note: the remaining chunks are computed in {compute_dt}; the first ones "
                    f"were computed in {old['dtype']}")
            where = f"{n_actors} GPU actor(s)" if options["num_gpus"] else \
                f"{n_actors} CPU actor(s) x {threads} thread(s)"
            stage(2, n_stages, f"impute {K} tracks over {len(chrom_list)} chromosome(s): "
                  f"{len(todo)} of {len(plan)} chunks to compute ({len(plan) - len(todo)} done "
                  f"before) on {where}, {compute_dt}")
            spec = WorkerSpec(model, store, part, cols, cells, assays,
                              np.array([ci[r["cell_key"]] for r in recs], dtype=np.int64),
                              np.array([ai[r["assay"]] for r in recs], dtype=np.int64),
                              array_keys, dtype=compute_dt, threads=threads, batch_bins=batch_bins,
                              hooks={k: v for k, v in hooks.items() if k in ("die_on", "die_marker", "log")})
            prog = Progress(len(todo), "imputing", unit="chunks")
            stats = _run_pool(spec, todo, n_actors, options, prog, hooks)
            summary["actor_failures"] = stats["actor_failures"]
            if stats["actors"]:
                summary["peak_actor_rss_mib"] = max(a["peak_rss_mib"] for a in stats["actors"])
                summary["actors"] = stats["actors"]
        else:
            stage(2, n_stages, "every chunk is already computed")
        check_complete(part, [(array_keys[c.chrom], c.index) for c in plan], "Imputation output")
        finalise(part, final)
        done_info = {**_read_run(out), "completed": _now()}
        if summary.get("actors"):
            done_info["device"] = summary["actors"][0]["device"]
        storage.write_text_atomic(storage.join(out, "run.json"), json.dumps(done_info, indent=2) + "\n")
    secs = time.monotonic() - t0
    summary["seconds"] = secs
    summary["target_bins_per_s"] = K * computed_bins / secs if secs > 0 else 0.0
    mem = (f", peak actor memory {summary['peak_actor_rss_mib']:.0f} MiB"
           if summary["peak_actor_rss_mib"] else "")
    log(f"imputed {K} tracks x {n_bins_total:,} bins ({K * n_bins_total:,} target-bins; "
        f"{summary['chunks_computed']} chunks computed, {summary['chunks_skipped']} skipped) in "
        f"{secs:.1f} s: {summary['target_bins_per_s']:,.0f} target-bins/s{mem}")
    if export:
        from .export import export as run_export

        stage(3, n_stages, "export bigWigs")
        summary["export"] = run_export(out, space=space, force=force)
    return summary


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def describe_run(run_dir: str) -> str:
    """What ``edice info RUN_DIR`` prints: settings, chunks done/total, bigWigs written."""
    info = _read_run(run_dir)
    if info is None:
        raise InputError(f"{run_dir} has no run.json: it is not an imputation run folder.")
    final = storage.join(run_dir, OUTPUT_NAME)
    part = storage.join(run_dir, partial_path(OUTPUT_NAME))
    n = int(info.get("n_chunks", 0))
    if storage.exists(final):
        done, status = n, "imputation complete"
    elif storage.exists(part):
        done, status = len(done_set(part)), "imputation in progress or interrupted (re-run to resume)"
    else:
        done, status = 0, "imputation not started"
    recs = info["targets"]
    bw_dir = storage.join(run_dir, "bigwig")
    names = set(storage.list_dir(bw_dir))
    written = sum(f"{r['track_id']}.bigWig" in names for r in recs)
    shown = ", ".join(f"{r['cell_key']}:{r['assay']}" for r in recs[:10])
    lines = [
        f"imputation run {run_dir}",
        f"created        {info.get('created')} (edice-dist {info.get('tool_version')})",
        f"store          {info['store']}",
        f"model          {info['model']} (sha256 {info['model_sha256'][:12]})",
        f"targets        {len(recs)}: {shown}{', ...' if len(recs) > 10 else ''}",
        f"supports       {len(info.get('supports', []))} observed tracks",
        f"chromosomes    {len(info['chroms'])}: {', '.join(info['chroms'][:10])}"
        f"{', ...' if len(info['chroms']) > 10 else ''} ({info.get('bins', 0):,} bins)",
        f"chunks         {done}/{n} done ({info['chunk_bins']} bins each); {status}",
        f"bigWigs        {written}/{len(recs)} written in {bw_dir}",
    ]
    return "\n".join(lines)
