"""A real autoscaling multi-node Ray cluster on one machine: GPU nodes added and removed by
Ray's own autoscaler, data-parallel training across two nodes, and whole nodes lost in
the middle of training and of imputation.

The cluster is Ray's fake multi-node provider behind a real head (``tests/rayhead.py``,
what ``ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True)`` starts): a CPU head
without GPUs and a GPU worker type (1 CPU, 1 fake GPU, 0 to 2 nodes) that the autoscaler
starts and stops as local raylets. Autoscaler v2, because it replaces a node whose raylet
died (v1 trusts the provider, and the fake provider never sees a node die). The GPUs are fake, so the jobs run with the ``fake_gpus`` test fault: GPU
actors and workers are scheduled as on GPUs and compute on the CPU (gloo for DDP). A lost
node is the ``*_lose_node_*`` faults: the worker kills its node's raylet (every process of
the node dies with it), as when a spot instance is reclaimed.

Why a cluster of its own, with the jobs in subprocesses: a process joins one Ray at a
time, and the test session's Ray (``ray_local``, a local single-node Ray in this process)
serves every other test. Shutting it down and joining another cluster from here would
leave Ray's global state to every later test; a job, on the other hand, is a driver
process that joins the cluster through ``RAY_ADDRESS``, exactly as ``ray job submit``
runs it. So the jobs run as ``jobs/train.py`` and ``jobs/impute.py`` in fresh processes,
this process watches the cluster through the dashboard's State API, and the clean
reference runs use the session's Ray. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from rayhead import RayHead
from trainstore import make_store

from edice_dist import _faults, checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GPU_NODES = 2
# The model is pinned (no same-assay skip, plain MSE, no weight average) so that its selection keeps all 3
# epochs, which the node-loss checks count on; what they test is the recovery.
TRAIN = {"embed_dim": 16, "n_heads": 2, "ffn_dim": 16, "decoder_hidden": 32, "epochs": 3,
         "bins_per_epoch": 1024, "batch_size": 64, "val_bins": 500, "seed": 0, "patience": 3,
         "workers": 2, "cpus_per_worker": 1, "max_failures": 3, "same_assay": "none",
         "peak_weight": 0, "average_decay": 0}
LOSE_EPOCH = 2
LOSE_CHUNK = "chr1:3"
JOB_TIMEOUT_S = 420
IDLE_MINUTES = 1 / 3
IDLE_TIMEOUT_S = 120
HEAD_TIMEOUT_S = 180


class Watch(threading.Thread):
    """Snapshots of the cluster once a second: the alive GPU nodes and the nodes of the
    alive training workers and imputation actors."""

    def __init__(self, head: RayHead):
        super().__init__(daemon=True)
        self.head, self.snaps, self.errors = head, [], 0
        self.stopping = threading.Event()

    def snapshot(self) -> dict:
        nodes = [n for n in self.head.state("nodes") if n["state"] == "ALIVE"]
        actors = [a for a in self.head.state("actors") if a["state"] == "ALIVE"]

        def where(cls):
            return {a["node_id"] for a in actors if a["class_name"] == cls}

        return {"t": time.monotonic(),
                "gpu_nodes": {n["node_id"] for n in nodes
                              if n["resources_total"].get("GPU", 0) >= 1},
                "head_gpus": sum(n["resources_total"].get("GPU", 0) for n in nodes
                                 if n["is_head_node"]),
                "train": where("RayTrainWorker"), "impute": where("ChunkWorker")}

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.snaps.append(self.snapshot())
            except Exception:  # noqa: BLE001 - the dashboard may be busy; the next one counts
                self.errors += 1
            self.stopping.wait(1.0)

    def between(self, t0: float, t1: float) -> list[dict]:
        return [s for s in self.snaps if t0 <= s["t"] <= t1]

    def until_no_gpu_nodes(self, timeout: float) -> float:
        """Seconds until no GPU node is alive (AssertionError after ``timeout``)."""
        t0, s = time.monotonic(), {"gpu_nodes": "unknown"}
        while time.monotonic() - t0 < timeout:
            try:
                s = self.snapshot()
            except Exception:  # noqa: BLE001 - the dashboard may be busy; ask again
                self.errors += 1
            else:
                if not s["gpu_nodes"]:
                    return time.monotonic() - t0
            time.sleep(1)
        raise AssertionError(f"GPU nodes still up after {timeout} s: {s['gpu_nodes']}")


def _first_snapshot(watch: Watch, timeout: float) -> dict:
    """The cluster as it is before any job, once the State API lists the head (on a
    loaded machine the dashboard may time out or answer an empty list for a while)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            s = watch.snapshot()
            if watch.head.state("nodes"):
                return s
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(1)
    raise AssertionError(f"the head's State API did not list it within {timeout} s: {last!r}")


def _job(head: RayHead, job: str, config: str, faults: dict, log: Path) -> subprocess.CompletedProcess:
    env = dict(head.env, RAY_ADDRESS=head.gcs_address, **{_faults.ENV: json.dumps(faults)})
    r = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--config", config],
                       env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (f"jobs/{job}.py failed:\n{(r.stdout + r.stderr)[-8000:]}\n"
                               f"autoscaler:\n{head.autoscaler_log()}")
    return r


@pytest.fixture(scope="module")
def cluster_jobs(tmp_path_factory):
    """Training then imputation as jobs on the autoscaling cluster, each losing a node on
    the way, with what the watcher saw."""
    root = tmp_path_factory.mktemp("multinode")
    store = str(root / "store")
    make_store(store, n_cells=5, n_assays=3, chrom_bins=(1400, 700), chunk_bins=256,
               splits={(0, 1): "val", (4, 2): "test"}, missing=((2, 2),), dtype="float16")
    cfg = root / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": store, "model": str(root / "model"), "run": str(root / "run"),
        "cluster": {"gpus": GPU_NODES, "gpu_wait_s": 180},
        "train": {**TRAIN, "use_gpu": True}, "impute": {}}))
    head = RayHead(
        # Idle nodes go after 20 s: long enough for a job to start using the nodes it asked
        # for (the autoscaler counts a node that nothing uses yet as idle), short for a test.
        num_cpus=1, idle_timeout_minutes=IDLE_MINUTES,
        worker_node_types={"gpu": {
            "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100 * 2**20},
            "node_config": {}, "min_workers": 0, "max_workers": GPU_NODES}},
        # A lost node is noticed in seconds (GCS health checks), replaced in seconds
        # (autoscaler heartbeats); Ray Train polls its workers often and waits long
        # enough for a replacement node.
        system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                       "health_check_initial_delay_ms": 1000},
        extra_env={"AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                   "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}).start(timeout=HEAD_TIMEOUT_S)
    watch = Watch(head)
    try:
        first = _first_snapshot(watch, timeout=HEAD_TIMEOUT_S)
        watch.start()
        faults = {"fake_gpus": True, "train_lose_node_epoch": LOSE_EPOCH,
                  "impute_lose_node_chunk": LOSE_CHUNK}
        t = {"train0": time.monotonic()}
        train_log = _job(head, "train", str(cfg), faults, root / "train.log")
        t["train1"] = time.monotonic()
        t["train_idle_s"] = watch.until_no_gpu_nodes(IDLE_TIMEOUT_S)
        t["impute0"] = time.monotonic()
        impute_log = _job(head, "impute", str(cfg), faults, root / "impute.log")
        t["impute1"] = time.monotonic()
        t["impute_idle_s"] = watch.until_no_gpu_nodes(IDLE_TIMEOUT_S)
    finally:
        watch.stopping.set()
        if watch.ident is not None:  # started
            watch.join(timeout=10)
        head.stop()
    return {"root": root, "store": store, "first": first, "watch": watch, "t": t,
            "train_log": train_log.stdout + train_log.stderr,
            "impute_log": impute_log.stdout + impute_log.stderr}


def test_autoscaler_adds_gpu_nodes_for_training_and_imputation_and_removes_them(cluster_jobs):
    """A job asking for GPUs on a head without GPU nodes: the autoscaler adds GPU-typed
    nodes for training and for imputation (their workers and actors run there) and
    removes them once the job is done and they are idle."""
    c, w, t = cluster_jobs, cluster_jobs["watch"], cluster_jobs["t"]
    assert c["first"]["gpu_nodes"] == set() and c["first"]["head_gpus"] == 0
    assert "cluster: asking the autoscaler for 2 GPU(s) (0 now)" in c["train_log"]
    assert "cluster: asking the autoscaler for 2 GPU(s) (0 now)" in c["impute_log"]
    for phase in ("train", "impute"):
        snaps = w.between(t[f"{phase}0"], t[f"{phase}1"])
        assert max(len(s["gpu_nodes"]) for s in snaps) == GPU_NODES, phase
        used = set().union(*(s[phase] for s in snaps))
        every_gpu_node = set().union(*(s["gpu_nodes"] for s in snaps))
        assert used and used <= every_gpu_node, phase  # only ever on GPU nodes
    # Removed when idle: soon after the job's end (idle timeout 20 s).
    assert t["train_idle_s"] < IDLE_TIMEOUT_S and t["impute_idle_s"] < IDLE_TIMEOUT_S
    info = json.loads((c["root"] / "run" / "run.json").read_text())
    assert info["actors"] and all(a["device"] == "cpu" for a in info["actors"])  # fake GPUs


def test_data_parallel_training_spans_two_nodes(cluster_jobs):
    """The two Ray Train workers (DDP over gloo) run at the same time on two nodes."""
    w, t = cluster_jobs["watch"], cluster_jobs["t"]
    spans = [s for s in w.between(t["train0"], t["train1"]) if len(s["train"]) == 2]
    assert spans, "never saw both training workers alive on two nodes"
    assert all(s["train"] <= s["gpu_nodes"] for s in spans)
    assert "2 worker(s) on GPU" in cluster_jobs["train_log"]


def test_node_loss_mid_training_gives_the_clean_model(cluster_jobs, ray_local, tmp_path):
    """A node lost during epoch 2 (the worker's raylet killed): Ray Train restarts the
    worker group from the epoch-1 checkpoint on a replacement node, and the model is the
    one a clean run trains, bit for bit."""
    from edice_dist.train import train
    from edice_dist.trainconfig import load_config

    model = cluster_jobs["root"] / "model"
    note = (model / _faults.MARKER).read_text()
    assert f"the node of worker 1 was lost during epoch {LOSE_EPOCH}" in note
    _, meta = checkpoint.load_model(str(model))
    assert meta["restores"] == [{"from_epoch": LOSE_EPOCH - 1, "why": "worker failure"}]
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]

    clean = str(tmp_path / "clean")
    train(cluster_jobs["store"], clean,
          load_config(None, {k: str(v) for k, v in {**TRAIN, "use_gpu": False}.items()}))
    a = torch.load(model / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(clean) / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_node_loss_mid_imputation_gives_the_clean_output(cluster_jobs, ray_local, tmp_path):
    """A node lost while an actor computes chunk chr1:3: the driver replaces the lost
    actor (on a node the autoscaler adds) and redoes what it had not confirmed; the
    output is the one a clean run writes."""
    from edice_dist.impute import impute

    run = cluster_jobs["root"] / "run"
    assert (run / _faults.MARKER).read_text() == LOSE_CHUNK.replace(":", "\t") + "\n"
    assert "imputation actor failed" in cluster_jobs["impute_log"]
    clean = str(tmp_path / "clean")
    impute(cluster_jobs["store"], str(cluster_jobs["root"] / "model"), clean, workers=2,
           export=False)
    a = zarr.open_group(str(run / "imputed.zarr"), mode="r")
    b = zarr.open_group(os.path.join(clean, "imputed.zarr"), mode="r")
    assert a.attrs["completed"] and b.attrs["completed"]
    for chrom in ("chr1", "chr2"):
        x, y = np.asarray(a[chrom][:]), np.asarray(b[chrom][:])
        assert np.isfinite(x).all()
        np.testing.assert_array_equal(x, y)
    assert len(list((run / "bigwig").glob("*.bigWig"))) == a["chr1"].shape[0]
