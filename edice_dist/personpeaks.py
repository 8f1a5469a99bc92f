"""Person-specific peaks: the peaks of one individual's track that the same cell type and
assay of the other individuals lack.

The paper's second result (ENTEx: four donors, many tissues each) is that eDICE catches
signal specific to a person, which an average over other people (TrackAVG) cannot. The
bins that carry such signal are, per track of an individual, its peak bins that are not
peak bins in any other individual's track of the same cell type and assay, kept where they
form runs of at least :data:`MIN_BP` (150 bp): shorter slivers are the ragged edges of
shared peaks, not elements of their own.

Everything here is per chromosome on boolean bin masks: a chromosome's mask is one byte a
bin (~10 MB for the longest human chromosome at 25 bp), so whole chromosomes are cheap
while the genome never is held at once. Peaks come from a BED (a peak bin overlaps a peak
by >= 1 bp, as in :func:`edice_dist.genome.bed_bin_mask`) or, without one, are called
from the signal (-log10 p >= :data:`edice_dist.metrics.PEAK_PVAL`).
"""

from __future__ import annotations

import math

import numpy as np

from . import storage
from .genome import Genome, bed_bin_mask, read_bed

MIN_BP = 150
"""Shortest run of person-specific peak bins that counts (the paper's 150 bp)."""


def min_bins(min_bp: int = MIN_BP, bin_size: int = 25) -> int:
    """Bins a run needs to span ``min_bp``: ``ceil(min_bp / bin_size)`` (6 at 25 bp)."""
    return max(1, math.ceil(min_bp / bin_size))


def runs(mask: np.ndarray) -> np.ndarray:
    """The runs of True of a mask, shape (n_runs, 2): [start, stop) indices."""
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False]))
    edges = np.flatnonzero(m[1:] != m[:-1])
    return edges.reshape(-1, 2)


def keep_runs(mask: np.ndarray, shortest: int) -> np.ndarray:
    """``mask`` with its runs of True shorter than ``shortest`` bins cleared."""
    out = np.zeros(len(mask), dtype=bool)
    for a, b in runs(mask):
        if b - a >= shortest:
            out[a:b] = True
    return out


def person_specific(own: np.ndarray, others: list[np.ndarray], shortest: int) -> np.ndarray:
    """Person-specific peak bins of one chromosome.

    Parameters
    ----------
    own : (n,) bool, the individual's peak bins.
    others : list of (n,) bool, the peak bins of the same cell type and assay in each other
        individual that has that track.
    shortest : bins a run must span (:func:`min_bins`).

    Returns
    -------
    (n,) bool: ``own`` and in no other, in runs of at least ``shortest`` bins.
    """
    mask = np.asarray(own, dtype=bool).copy()
    for o in others:
        mask &= ~np.asarray(o, dtype=bool)
    return keep_runs(mask, shortest)


def intervals(mask: np.ndarray, size_bp: int, bin_size: int = 25) -> np.ndarray:
    """The runs of a chromosome's bin mask as bp intervals, shape (n, 2), the last one
    clipped to the chromosome's end (a BED of them gives the same mask back)."""
    r = runs(mask) * bin_size
    if len(r):
        r[:, 1] = np.minimum(r[:, 1], size_bp)
    return r


def write_bed(path: str, per_chrom: dict[str, np.ndarray], genome: Genome) -> None:
    """Write ``{chrom: (n, 2) bp intervals}`` as a BED in the genome's order (atomically)."""
    lines = [f"{c}\t{s}\t{e}\n" for c in genome.chroms
             for s, e in per_chrom.get(c, np.empty((0, 2), np.int64)).tolist()]
    storage.write_text_atomic(path, "".join(lines))


class BedMasks:
    """Per-chromosome bin masks of a BED file, read once."""

    def __init__(self, path: str, genome: Genome):
        self.genome = genome
        self.iv = read_bed(path, genome)

    def mask(self, chrom: str) -> np.ndarray:
        """(n_bins of ``chrom``,) bool."""
        return bed_bin_mask(self.iv.get(chrom), 0, self.genome.n_bins(chrom),
                            self.genome.bin_size)
