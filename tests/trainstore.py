"""Small track stores with a known, learnable signal for the sampler and training tests.

Written with ``store.create`` and direct array writes (no bigWigs, no ingest), so a test
knows every value. The signal is low rank: at each bin a few latent "chromatin states"
are active, and each (cell, assay) track reads them through its cell's and its assay's
loadings. A cell's other assays therefore tell where its own states are active, which is
what eDICE can learn and the AVG baseline (same assay, other cells) cannot.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import zarr

from edice_dist import storage, store
from edice_dist.genome import Genome
from edice_dist.tracks import Track


def signal(n_bins: int, n_cells: int, n_assays: int, seed: int = 0, rank: int = 3,
           noise: float = 0.05) -> np.ndarray:
    """arcsinh-space values, shape (n_bins, n_cells, n_assays), float32."""
    rng = np.random.default_rng(seed)
    z = rng.gamma(0.3, 1.0, size=(n_bins, rank)) * (rng.random((n_bins, rank)) < 0.3)
    cl = rng.gamma(2.0, 0.5, size=(n_cells, rank))
    al = rng.gamma(2.0, 0.5, size=(n_assays, rank))
    lin = np.einsum("kr,cr,ar->kca", z, cl, al)
    vals = np.arcsinh(3.0 * lin) + noise * rng.standard_normal(lin.shape)
    return np.maximum(vals, 0).astype(np.float32)


def make_store(path: str, n_cells: int = 6, n_assays: int = 4,
               chrom_bins: tuple[int, ...] = (3000, 1700), chunk_bins: int = 512,
               missing: tuple[tuple[int, int], ...] = (), splits: dict | None = None,
               individual: str = "", cell_names: list[str] | None = None,
               assay_names: list[str] | None = None, seed: int = 0,
               dtype: str = "float32") -> tuple[store.TrackStore, dict]:
    """Create a complete store at ``path``.

    Parameters
    ----------
    missing : (cell, assay) index pairs that are not observed.
    splits : {(cell, assay): "val" | "test"}; every other observed track is "train".

    Returns
    -------
    (TrackStore, truth) where truth maps chromosome -> (n_bins, n_tracks) float32 values as
    written (before the store's dtype rounding).
    """
    splits = splits or {}
    cells = cell_names or [f"C{i:02d}" for i in range(n_cells)]
    assays = assay_names or [f"A{j}" for j in range(n_assays)]
    genome = Genome(tuple(f"chr{i + 1}" for i in range(len(chrom_bins))),
                    tuple(25 * n for n in chrom_bins))
    tracks, idx = [], []
    for i, c in enumerate(cells):
        for j, a in enumerate(assays):
            if (i, j) in missing:
                continue
            tracks.append(Track(c, a, f"/nowhere/{c}-{a}.bigWig", splits.get((i, j), "train"),
                                individual))
            idx.append((i, j))
    store.create(path, genome, tracks, chunk_bins=chunk_bins, dtype=dtype)
    root = zarr.open_group(storage.zarr_store(path), mode="r+")
    total = sum(chrom_bins)
    full = signal(total, len(cells), len(assays), seed=seed)
    truth, off = {}, 0
    for c, n in zip(genome.chroms, chrom_bins, strict=True):
        vals = np.stack([full[off:off + n, i, j] for i, j in idx], axis=1)
        root["signal"][store.array_key(c, genome.chroms.index(c))][:] = vals.astype(dtype)
        truth[c] = vals
        off += n
    store.mark_complete(path)  # what ingest does last
    return store.open_store(path), truth


SMALL = {"n_cells": 6, "n_assays": 4, "chrom_bins": (1500, 900), "chunk_bins": 256,
         "splits": {(0, 1): "val", (3, 2): "val", (5, 3): "test"}, "missing": ((2, 2),)}
"""The training tests' store: two validation tracks, a test track and a missing pair."""


def load_pt(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def epoch_state(out: str, epoch: int) -> dict:
    """The newest checkpoint of ``epoch`` in the model folder ``out`` (all its keys)."""
    for run in sorted(os.listdir(os.path.join(out, "ray")), reverse=True):
        p = os.path.join(out, "ray", run, f"epoch_{epoch:04d}", "state.pt")
        if os.path.exists(p):
            return load_pt(p)
    raise AssertionError(f"no checkpoint of epoch {epoch} in {out}")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
