"""Measuring one ``edice`` stage as a process tree: shared by the end-to-end benchmarks
(``bench_genome.py``, ``bench_consortium.py``).

A stage runs as ``python -m edice_dist STAGE ...`` in a fresh process; its Ray daemons and
workers are its descendants (a local Ray), so everything it costs is in its tree. A
:class:`Sampler` thread walks the tree every second and records:

- CPU seconds: each process's last sampled user + system time, summed (a process shorter
  than the sampling period may be missed);
- peak memory: PSS (``/proc/PID/smaps_rollup``) summed over the processes of the tree
  (processes only, not threads), so that Ray's shared object store and shared libraries
  count once (STACK_NOTES), and the peak PSS of its largest process;
- bytes read and written: ``rchar`` / ``wchar`` of ``/proc/PID/io`` (every ``read`` and
  ``write`` call, page cache or not, sockets and pipes included: Ray's gRPC traffic counts
  too) and ``write_bytes`` (what reached the block layer), each process's last value,
  summed;
- open file handles: the peak over samples of the descriptors open in the whole tree, of
  the most in one process, and of the most *data files* (bigWig, bedGraph, Zarr chunks,
  BED) open in one process: a stage that held one handle per track would show the number
  of tracks there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import proc_cpu, tree_pids  # noqa: E402  (benchmarks/reference.py)

DATA_SUFFIXES = (".bigwig", ".bw", ".bedgraph", ".bed", ".bdg")


def pss(pid: int) -> int:
    """PSS bytes of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, IndexError, ValueError):
        return 0


def proc_io(pid: int) -> dict[str, int] | None:
    """``rchar``, ``wchar`` and ``write_bytes`` of one process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            d = dict(line.split(": ") for line in f.read().splitlines())
        return {k: int(d[k]) for k in ("rchar", "wchar", "write_bytes")}
    except (OSError, KeyError, ValueError):
        return None


def open_files(pid: int) -> tuple[int, int]:
    """(descriptors open, of which data files) of one process; (0, 0) once it is gone."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0, 0
    data = 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}").lower()
        except OSError:
            continue
        # Zarr chunk files are named by their chunk index under c/ (v3 layout).
        if target.endswith(DATA_SUFFIXES) or "/signal/" in target or "/c/" in target:
            data += 1
    return len(fds), data


class Sampler(threading.Thread):
    """Peaks and totals of a process tree, sampled every ``every`` seconds (module doc)."""

    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0  # summed PSS, bytes
        self.peak_proc = 0  # largest single process's PSS, bytes
        self.cpu: dict[int, float] = {}
        self.io: dict[int, dict[str, int]] = {}
        self.fds = self.fds_proc = self.data_fds_proc = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(self.every)

    def sample(self) -> None:
        total = fds = 0
        for p in tree_pids(self.pid):  # processes only, not threads
            m = pss(p)
            total += m
            self.peak_proc = max(self.peak_proc, m)
            self.cpu[p] = max(self.cpu.get(p, 0.0), proc_cpu(p) or 0.0)
            io = proc_io(p)
            if io is not None:
                self.io[p] = io
            n, data = open_files(p)
            fds += n
            self.fds_proc = max(self.fds_proc, n)
            self.data_fds_proc = max(self.data_fds_proc, data)
        self.peak = max(self.peak, total)
        self.fds = max(self.fds, fds)

    def io_total(self, key: str) -> int:
        return sum(v[key] for v in self.io.values())


def du(path: str) -> tuple[int, int]:
    """(bytes, files) under ``path`` (a file counts as one); (0, 0) when it does not exist."""
    if os.path.isfile(path):
        return os.path.getsize(path), 1
    size = files = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            try:
                size += os.path.getsize(os.path.join(d, f))
                files += 1
            except OSError:  # a dangling link
                pass
    return size, files


def run_stage(name: str, args: list[str], output: str, log: str, env: dict | None = None,
              every: float = 1.0, check: bool = True) -> dict:
    """Run ``edice ARGS`` in a fresh process and measure it (module doc).

    Returns
    -------
    dict
        ``stage``, ``status``, ``wall_s``, ``cpu_s``, ``peak_pss_mib``,
        ``peak_proc_pss_mib``, ``read_mb`` / ``written_mb`` (rchar / wchar),
        ``disk_written_mb`` (write_bytes), ``fds`` (tree), ``fds_proc``,
        ``data_fds_proc`` (peaks), ``disk_bytes`` and ``files`` of ``output``.
    """
    env = {**os.environ,
           "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
           "RAY_DEDUP_LOGS": "0", **(env or {})}  # the caller's may name another checkout
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    with open(log, "a") as lf:
        lf.write(f"\n=== {name}: edice {' '.join(args)}\n")
        lf.flush()
        proc = subprocess.Popen([sys.executable, "-m", "edice_dist", *args], env=env,
                                stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        mem = Sampler(proc.pid, every)
        mem.start()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    mem.stopping.set()
    mem.join()
    if rc and check:
        raise SystemExit(f"{name} failed with status {rc}; see {log}")
    size, files = du(output)
    row = {"stage": name, "status": rc, "wall_s": wall, "cpu_s": sum(mem.cpu.values()),
           "peak_pss_mib": mem.peak / 2**20, "peak_proc_pss_mib": mem.peak_proc / 2**20,
           "read_mb": mem.io_total("rchar") / 1e6, "written_mb": mem.io_total("wchar") / 1e6,
           "disk_written_mb": mem.io_total("write_bytes") / 1e6, "fds": mem.fds,
           "fds_proc": mem.fds_proc, "data_fds_proc": mem.data_fds_proc,
           "disk_bytes": size, "files": files}
    print(json.dumps(row), flush=True)
    return row
