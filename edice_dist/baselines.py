"""The AVG and TrackAVG baselines of an evaluation, averaged in one pass over the store.

A baseline of a truth track is, per bin, the mean of a set of the store's columns (AVG:
the same assay in the other cell keys; TrackAVG: the same cell type and assay in the other
individuals; :func:`edice_dist.evaluate.plan_jobs` picks them). Read track by track, each
baseline decodes every store chunk it touches, and a chunk holds *all* tracks: the
evaluation would read the whole store once per truth track, targets x tracks x bins in
all (at Roadmap's shape, 2,000 reads of a 1,000-track store). Many truth tracks share one
set besides (every held-out track of an assay whose cell has no observed track of it
averages the same columns), so the distinct sets are averaged together here, one chunk of
all tracks at a time, into a small Zarr group beside the evaluation's tables::

    OUT/_baselines/zarr.json     attributes: groups (the column sets), space, store
    OUT/_baselines/<array_key>   float32 (n_bins, n_groups), shards (chunk_bins, n_groups)
                                 of inner chunks (chunk_bins, 1)

The evaluation jobs read their column of it (:func:`read`: one inner chunk per store
chunk, not the other sets, whose number grows with the truth tracks when TrackAVG sets are
per individual); it is removed when they are done. Values are those of :func:`edice_dist.evaluate.baseline_window` to the bit: the same
float32 reads, transform and mean. Work is split into parts of whole chunks, Ray tasks
when Ray is running, each writing only its own chunks (STACK_NOTES: zarr writers must own
whole chunks); memory is one chunk of all tracks per part.
"""

from __future__ import annotations

import numpy as np

from . import spaces, storage
from .progress import Progress

BASELINES_DIR = "_baselines"
MAX_PART_CHUNKS = 16
"""Store chunks per part: enough to amortise a task's start, few enough to balance."""


READ_BINS = 4096
"""Bins of every track per read, whole inner chunks of the store: a 16,384-bin chunk of
1,000 tracks read at once is 66 MB of float32, and its decoding about as much again."""


def path_of(out: str) -> str:
    return storage.join(out, BASELINES_DIR)


def _fill(store_path: str, path: str, chrom: str, start: int, stop: int,
          groups: list[tuple[int, ...]], space: str) -> int:
    """Average ``groups`` over bins ``[start, stop)`` of ``chrom`` (whole chunks), chunk by
    chunk, into the baseline array; returns the chunks written."""
    import zarr

    from .store import open_store

    store = open_store(store_path)
    arr = zarr.open_group(storage.zarr_store(path), mode="r+")[store.array_key(chrom)]
    cb, n = store.chunk_bins, 0
    step = max(store.block_bins, READ_BINS // store.block_bins * store.block_bins)
    for a in range(start, stop, cb):
        b = min(a + cb, stop)
        out = np.empty((b - a, len(groups)), np.float32)  # the writes cover whole chunks
        for s in range(a, b, step):  # every track, read once for all groups
            e = min(s + step, b)
            data = store.read(chrom, s, e)
            for g, cols in enumerate(groups):
                out[s - a:e - a, g] = spaces.to_space(data[:, list(cols)], space).mean(axis=1)
        arr[a:b] = out
        n += 1
    return n


def compute(store, groups: list[tuple[int, ...]], out: str, space: str,
            parallel: bool) -> str:
    """Write the baselines of ``groups`` (column sets of ``store``) under ``out``.

    Parameters
    ----------
    store : TrackStore
    groups : list of tuple of int
        Distinct, non-empty column sets; column ``g`` of the result averages ``groups[g]``.
    out : str
        The evaluation's folder.
    space : {"arcsinh", "pval"}
        Space of the means.
    parallel : bool
        Ray tasks (Ray must be initialised) rather than this process.

    Returns
    -------
    str
        The baselines' path, for :func:`read`.
    """
    import zarr

    path = path_of(out)
    storage.remove(path)  # a left-over of an interrupted run: averaged again
    root = zarr.open_group(storage.zarr_store(path), mode="w", zarr_format=3)
    root.attrs.update({"groups": [list(g) for g in groups], "space": space,
                       "store": store.path})
    parts = []
    for c in store.attrs["chroms"]:
        root.create_array(c["array"], shape=(c["n_bins"], len(groups)), dtype="float32",
                          chunks=(store.chunk_bins, 1), shards=(store.chunk_bins, len(groups)),
                          fill_value=0.0)
        step = store.chunk_bins * MAX_PART_CHUNKS
        parts += [(c["name"], a, min(a + step, c["n_bins"])) for a in range(0, c["n_bins"], step)]
    n_chunks = sum(-(-(b - a) // store.chunk_bins) for _, a, b in parts)
    prog = Progress(n_chunks, "baselines", unit="chunks")
    if parallel:
        import ray

        task = ray.remote(num_cpus=1, max_retries=1)(_fill)
        pending = [task.remote(store.path, path, ch, a, b, groups, space) for ch, a, b in parts]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            prog.update(ray.get(done[0]))
    else:
        for ch, a, b in parts:
            prog.update(_fill(store.path, path, ch, a, b, groups, space))
    return path


def open_group(path: str):
    """The baselines written by :func:`compute`, for :func:`read` (opened once per job)."""
    import zarr

    return zarr.open_group(storage.zarr_store(path, read_only=True, strict=True), mode="r")


def read(group, array_key: str, column: int, start: int, stop: int) -> np.ndarray:
    """Bins ``[start, stop)`` of baseline ``column`` of one chromosome's array.

    Returns
    -------
    np.ndarray, shape (stop - start,), float32
    """
    return np.asarray(group[array_key][start:stop, column], np.float32)
