"""The imputation actor pool: GPU-pinned (or CPU) Ray actors that each load the model
once and compute whole chunks of the output store, and the driver loop that feeds them.

While a chunk computes, an actor reads the next one and writes the previous one in
background threads; a call returns the chunks whose writes (and done markers) completed,
and only those count as done. A dead actor is replaced and everything it had not
confirmed is redone, up to :data:`MAX_ATTEMPTS` failures of one chunk. No bulk data
passes through the driver or Ray's object store: actors read the track store and write
the output store themselves.
"""

from __future__ import annotations

import errno
import os
import resource
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import _faults, storage
from ._partial import mark_done
from .context import Halo, n_channels, read_halo
from .errors import EdiceError, InputError, explain
from .genome import Chunk
from .progress import Progress, log
from .runfolder import spread_array

WINDOW_BYTES = 32 * 2**20
"""Model input (float32 values and context channels of every support) per window of a
chunk. A 16,384-bin chunk of 1,000 supports with 3 context channels is 260 MB of input;
computed whole, and with the next one prefetched, it made an imputation actor 2.8x larger
at 1,000 tracks than at 250 (BENCHMARKS.md, issue 22)."""
WINDOW_ALIGN = 1024  # window lengths are multiples of this (whole batches)

MAX_ATTEMPTS = 3  # failures of one chunk before the run gives up
# CPU actors are single-threaded by default: two 1-thread actors imputed 1.5-3x faster
# than one 2-thread actor on the 2-core reference box (benchmarks/bench_impute.py).
CPU_THREADS_PER_ACTOR = 1


def window_bins(n_supports: int, n_channels: int) -> int:
    """Bins per window of a chunk whose model input is about :data:`WINDOW_BYTES`."""
    per_bin = 4 * max(1, n_supports) * max(1, n_channels)
    return max(WINDOW_ALIGN, WINDOW_BYTES // per_bin // WINDOW_ALIGN * WINDOW_ALIGN)


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
    run_dir: str
    support_cols: np.ndarray
    support_cells: np.ndarray
    support_assays: np.ndarray
    target_cells: np.ndarray
    target_assays: np.ndarray
    array_keys: dict  # chrom -> array key
    device: str | None = None  # None: the actor's own choice (actor_device)
    dtype: str | None = None  # None: the actor's own choice for its device
    threads: int | None = None  # None: the actor's own choice (actor_threads)
    batch_bins: int | None = None
    samples: int = 0  # Monte Carlo dropout samples for the spreads (0: none)
    faults: dict = field(default_factory=dict)  # tests only (edice_dist._faults)


def _failed(chunk: Chunk, doing: str, path: str, e: BaseException) -> EdiceError:
    """An actor's error with its context (which chunk, which file) in one paragraph; it
    reaches the driver, which names that chunk rather than another one the actor held."""
    return EdiceError(f"Imputing {chunk.chrom} bins {chunk.start}-{chunk.stop} (chunk "
                      f"{chunk.index}) failed while {doing} {path}: {explain(e)}")


def actor_device(spec: WorkerSpec):
    """This actor's torch device, decided here: a GPU when Ray gave the actor one (and
    torch sees it), else the CPU.

    Raises
    ------
    EdiceError
        Ray gave the actor a GPU that torch cannot use (a CPU build of torch on a GPU
        node, a missing driver): computing on the CPU instead would be ~100x slower, so
        this is an error, unless the test fault ``fake_gpus`` says that the GPUs are
        fake (tests of GPU scheduling on machines without GPUs).
    """
    import ray
    import torch

    if spec.device is not None:
        return torch.device(spec.device)
    gpus = ray.get_gpu_ids()
    if not gpus:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if spec.faults.get("fake_gpus"):
        return torch.device("cpu")
    raise EdiceError(
        f"Ray gave this imputation actor GPU {gpus[0]} on node "
        f"{ray.get_runtime_context().get_node_id()[:12]}, but torch {torch.__version__} there "
        "sees no CUDA device (a CPU build of torch, or no NVIDIA driver). Install the CUDA "
        "build of torch on the GPU nodes, or run with --gpus 0 to impute on CPUs."
    )


def actor_threads(spec: WorkerSpec, device) -> int:
    """Torch threads for this actor, from its own node: on a CPU, the CPUs Ray reserved
    for it (one thread per reserved CPU: BENCHMARKS.md, Imputation); beside a GPU, which
    does the work, up to 4 of this machine's cores per GPU of its node."""
    import ray

    if spec.threads:
        return int(spec.threads)
    ctx = ray.get_runtime_context()
    if device.type != "cuda":
        return max(1, int(ctx.get_assigned_resources().get("CPU", 1)))
    node = next((n for n in ray.nodes() if n["NodeID"] == ctx.get_node_id()), {})
    per_gpu = len(os.sched_getaffinity(0)) // max(1, int(node.get("Resources", {}).get("GPU", 1)))
    return max(1, min(4, per_gpu))


class ChunkWorker:
    """One imputation actor: model loaded once, reads/computes/writes whole chunks.

    Its errors are EdiceErrors that name the chunk and the file (:func:`_failed`); the
    driver stops on them at once (a dead actor is what it retries). An error while
    starting (the model or a store cannot be opened) is kept and raised by the first
    call, so that it arrives as such an error, not as a dead actor.
    """

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self._init_error: EdiceError | None = None
        try:
            self._start(spec)
        except Exception as e:
            self._init_error = EdiceError(f"An imputation actor could not start (model "
                                          f"{spec.model_dir}, store {spec.store_path}, output "
                                          f"{spec.out_path}): {explain(e)}")

    def _start(self, spec: WorkerSpec) -> None:
        import torch
        import zarr

        from .checkpoint import load_model
        from .predict import prepare
        from .store import open_store

        self.spec = spec
        # Device, threads and dtype are this actor's own: its node may have other CPUs
        # and GPUs than the driver's.
        device = actor_device(spec)
        torch.set_num_threads(actor_threads(spec, device))
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

    def _read(self, chunk: Chunk) -> Halo:
        # The store's values only: the context channels are computed per window in
        # _predict, so that what a prefetched chunk holds does not grow 8-fold with them.
        return read_halo(self.store, chunk.chrom, chunk.start, chunk.stop,
                         self.spec.support_cols, self.pred.model.cfg.context)

    def _predict(self, halo: Halo, seed: int):
        """The chunk's predictions (and spread), computed over windows of
        :func:`window_bins` bins."""
        from .predict import predict_chunk

        spec, context = self.spec, self.pred.model.cfg.context
        S, n = halo.data.shape[1], halo.n
        step = window_bins(S, n_channels(context))
        y = spread = None
        for s0 in range(0, n, step):
            s1 = min(s0 + step, n)
            r = predict_chunk(self.pred, halo.channels(context, s0, s1), np.arange(S),
                              spec.support_cells, spec.support_assays, spec.target_cells,
                              spec.target_assays, batch_bins=spec.batch_bins,
                              samples=spec.samples, seed=seed + s0)
            r, sd = r if spec.samples else (r, None)
            if s1 - s0 == n:
                return r, sd
            if y is None:
                y = np.empty((r.shape[0], n), dtype=np.float32)
                spread = np.empty_like(y) if sd is not None else None
            y[:, s0:s1] = r
            if sd is not None:
                spread[:, s0:s1] = sd
        return y, spread

    def _write_chunk(self, chunk: Chunk, y: np.ndarray, spread: np.ndarray | None) -> None:
        if _faults.at_chunk(self.spec.faults, "impute_enospc_chunk", chunk.chrom, chunk.index):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it
        key = self.spec.array_keys[chunk.chrom]
        self.out[key][:, chunk.start:chunk.stop] = y
        if spread is not None:
            self.out[spread_array(key)][:, chunk.start:chunk.stop] = spread
        mark_done(self.spec.out_path, key, chunk.index)  # only after the data is written

    def _finish_write(self) -> list[tuple[str, int]]:
        if self._write is None:
            return []
        chunk, fut = self._write
        self._write = None
        try:
            fut.result()  # re-raises a failed write, of this chunk (not the one computing)
        except Exception as e:
            raise _failed(chunk, "writing", self.spec.out_path, e) from e
        return [(chunk.chrom, chunk.index)]

    def compute(self, chunk: Chunk, next_chunk: Chunk | None = None) -> list[tuple[str, int]]:
        """Predict ``chunk`` and start its write; prefetch ``next_chunk``.

        Returns
        -------
        list of (chrom, index)
            Chunks whose data and done marker are now written (the previous one).
        """
        if self._init_error is not None:
            raise self._init_error
        if _faults.at_chunk(self.spec.faults, "impute_exit_chunk", chunk.chrom, chunk.index):
            _faults.exit_once(self.spec.run_dir, f"{chunk.chrom}\t{chunk.index}")
        if _faults.at_chunk(self.spec.faults, "impute_lose_node_chunk", chunk.chrom,
                            chunk.index):
            _faults.exit_once(self.spec.run_dir, f"{chunk.chrom}\t{chunk.index}",
                              whole_node=True)
        t0 = time.perf_counter()
        try:
            if self._prefetch is not None and self._prefetch[0] == chunk:
                x = self._prefetch[1].result()
            else:
                x = self._read(chunk)
        except Exception as e:
            raise _failed(chunk, "reading", self.spec.store_path, e) from e
        self._prefetch = None
        self.read_wait_s += time.perf_counter() - t0
        if next_chunk is not None:
            self._prefetch = (next_chunk, self._reader.submit(self._read, next_chunk))
        t1 = time.perf_counter()
        try:
            y, spread = self._predict(x, zlib.crc32(f"{chunk.chrom}:{chunk.index}".encode()))
        except Exception as e:
            raise _failed(chunk, "computing with the model", self.spec.model_dir, e) from e
        self.compute_s += time.perf_counter() - t1
        self.n_computed += 1
        log_path = self.spec.faults.get("impute_log")
        if log_path:
            with open(log_path, "a") as f:  # one short O_APPEND write per line
                f.write(f"{chunk.chrom}\t{chunk.index}\n")
        done = self._finish_write()
        self._write = (chunk, self._writer.submit(self._write_chunk, chunk, y, spread))
        return done

    def where(self) -> tuple[int, str]:
        """(pid, Ray node id) of this actor's process."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def flush(self) -> list[tuple[str, int]]:
        """Wait for the last write; returns the chunks it completes."""
        if self._init_error is not None:
            raise self._init_error
        return self._finish_write()

    def stats(self) -> dict:
        import ray
        import torch

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "peak_rss_mib": _peak_rss_mib(), "chunks": self.n_computed,
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


def run_pool(spec: WorkerSpec, todo: list[Chunk], n_actors: int, options: dict,
             progress: Progress) -> dict:
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
    stop_after = spec.faults.get("impute_stop_after")

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
                f"{worst.index}) failed {MAX_ATTEMPTS} times; last error: {explain(err)} Fix "
                "the cause and run the same command again: finished chunks are kept."
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
                    raise e.cause from e
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
