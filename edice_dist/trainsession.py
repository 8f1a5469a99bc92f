"""Where a training loop runs: on Ray Train workers, or in the driver's own process.

:func:`edice_dist.trainloop.train_loop` talks to a session for the few things that differ:
its rank, its device, wrapping the model for data parallelism, the state handed back
after a failure, and reporting an epoch's checkpoint. Both sessions write the same
checkpoint folders (``MODEL_DIR/ray/run-NNN/epoch_EEEE/``, :mod:`edice_dist.checkpoint`),
so a run resumes the same way whichever ran it.

A single worker on the embedded local Ray runs in process (:func:`run_local`): starting
Ray Train's controller, placement group and a worker process cost ~8 s of a small run's
~12 s start-up, for nothing that one local worker needs (BENCHMARKS.md, Training speed).
Several workers, GPUs on a cluster, or a submitted job use Ray Train (:class:`RaySession`),
which restarts dead worker processes.
"""

from __future__ import annotations

import os
import tempfile

import torch

from . import checkpoint, storage
from .checkpoint import METRICS, STATE
from .errors import EdiceError
from .progress import log


class RaySession:
    """A Ray Train worker: rank and world from Ray Train, DDP when world > 1."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool, fake_gpus: bool = False) -> torch.device:
        """This worker's device, decided here: the GPU Ray Train gave it, which torch
        must see (a GPU node with a CPU build of torch is an error, not a 100x slower
        run), or the CPU; ``fake_gpus`` (a test fault) computes on the CPU."""
        import ray
        import ray.train.torch

        if not use_gpu:
            return torch.device("cpu")
        if torch.cuda.is_available():
            return ray.train.torch.get_device()
        if fake_gpus:
            return torch.device("cpu")
        raise EdiceError(
            f"Ray gave training worker {self.rank} a GPU on node "
            f"{ray.get_runtime_context().get_node_id()[:12]}, but torch {torch.__version__} "
            "there sees no CUDA device (a CPU build of torch, or no NVIDIA driver). Install "
            "the CUDA build of torch on the GPU nodes, or train with --use_gpu=false."
        )

    def prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # DDP when world > 1. The loop has put the model on this worker's own device
        # (:meth:`device`): Ray's choice would be a GPU that torch cannot use when the
        # GPUs are fake.
        return ray.train.torch.prepare_model(net, move_to_device=False)

    def restored_state(self) -> dict | None:
        """The checkpoint Ray Train hands back after a worker failure, if any."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)

    def report(self, metrics: dict, files: dict[str, bytes] | None, name: str) -> None:
        """Report an epoch on every worker; rank 0 passes the checkpoint's files."""
        import ray.train

        if files is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="edice-ckpt-") as tmp:
            for fname, data in files.items():
                with open(os.path.join(tmp, fname), "wb") as f:
                    f.write(data)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)


class LocalSession:
    """The driver's own process as the only worker.

    Checkpoints are written straight into the run's folder, ``metrics.json`` last (a
    folder without it is partial), and, as Ray Train is configured to do, only the latest
    and the most recent best epoch are kept.
    """

    rank, world = 0, 1

    def __init__(self, out: str, run_name: str):
        self.run_dir = storage.join(out, "ray", run_name)
        self.out, self.run_name = out, run_name

    def device(self, use_gpu: bool, fake_gpus: bool = False) -> torch.device:
        return torch.device("cuda", 0) if use_gpu else torch.device("cpu")

    def prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        return net

    def restored_state(self) -> dict | None:
        return None  # the loop finds the run's newest checkpoint in its folder

    def report(self, metrics: dict, files: dict[str, bytes] | None, name: str) -> None:
        if files is None:
            return
        folder = storage.join(self.run_dir, name)
        storage.makedirs(folder)
        for fname in sorted(files, key=lambda f: f == METRICS):
            storage.write_bytes_atomic(storage.join(folder, fname), files[fname])
        keep = {name}
        mine = [c for c in checkpoint.epoch_checkpoints(self.out) if c["run"] == self.run_name]
        best = [c for c in mine if c["metrics"] and int(c["metrics"]["best_epoch"]) == c["epoch"]]
        if best:
            keep.add(best[-1]["name"])
        for c in mine:
            if c["name"] not in keep:
                storage.remove(c["path"])


def run_local(loop, job, max_failures: int) -> None:
    """Run ``loop(job, session)`` in this process; after an error, run it again from the
    run's newest checkpoint, up to ``max_failures`` times (-1: no limit). Our own errors
    (bad input) and interrupts are not retried."""
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    failures = 0
    try:
        while True:
            try:
                loop(job, LocalSession(job.out, job.run_name))
                return
            except (EdiceError, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - retried from the checkpoint, as Ray would
                failures += 1
                if 0 <= max_failures < failures:
                    raise
                log(f"{job.kind}: {type(e).__name__}: {e}; continuing from the newest "
                    f"checkpoint (failure {failures} of at most "
                    f"{'unlimited' if max_failures < 0 else max_failures})")
    finally:
        torch.set_num_threads(threads)
