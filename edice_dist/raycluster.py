"""Connecting to Ray: the embedded local default, or the cluster a job was submitted to."""

from __future__ import annotations

import os

import ray


def init(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start or join Ray once per process.

    Inside ``ray job submit`` (``RAY_ADDRESS`` set by the job) or with ``RAY_ADDRESS``
    exported, join that cluster; otherwise start a private local Ray (never silently join a
    ``ray start`` cluster on this machine) sized to ``num_cpus``.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls
    # (without it, every poll logs a warning); it listens on 127.0.0.1 only.
    dashboard = os.environ.get("EDICE_RAY_DASHBOARD", "1") != "0"
    kwargs = dict(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                  log_to_driver=True,
                  object_store_memory=int(os.environ.get("EDICE_OBJECT_STORE_BYTES", 256 * 2**20)))
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    ray.init(**kwargs)


def cpu_slots(reserve: int = 0) -> int:
    """How many 1-CPU tasks or actors can run at once, from what Ray reports."""
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, total - reserve)


def gpu_count() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
