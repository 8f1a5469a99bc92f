"""Local genomic context: the supports' means over windows around each bin, as inputs.

The paper's eDICE sees one 25 bp bin at a time. A mark's signal is correlated over
neighbouring bins (broad domains such as H3K9me3 and H3K27me3 span tens of kb), and the
read noise of each track is independent per bin, so a window mean of a support is a
less noisy view of its state at the bin than the bin alone. Per support track the model
may therefore get, besides the bin's value, its means over centred windows of
``2h + 1`` bins for each half-width ``h`` of ``ModelConfig.context``: channels
``(value, mean_h1, mean_h2, ...)``. This is what lets per-track methods such as
ChromImpute beat a per-bin model on broad marks (BENCHMARKS.md, Quality).

Windows never cross a chromosome's ends: there they are cut short and the mean is over
the bins they keep. Reads of a window of bins therefore take ``max(context)`` extra bins
on each side (a halo), cut at the chromosome's ends, so that a bin's features are the
same whichever chunk or block it was read with: training (the sampler's blocks) and
imputation (the actors' chunks) see identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the model imports this module; keep zarr out of its imports
    from .store import TrackStore


def n_channels(context: tuple[int, ...]) -> int:
    """Values per support track and bin: the bin itself and one mean per window."""
    return 1 + len(context)


def check(context) -> tuple[int, ...]:
    """``context`` as a sorted tuple of distinct positive half-widths.

    Raises
    ------
    ValueError
        A half-width below 1.
    """
    out = tuple(sorted({int(h) for h in context}))
    if any(h < 1 for h in out):
        raise ValueError(f"context half-widths must be positive numbers of bins, got {context}")
    return out


COLUMN_BLOCK = 128
"""Tracks per block of :func:`window_means`' running sums (its memory bound)."""


def window_means(x: np.ndarray, context: tuple[int, ...], left: int, right: int) -> np.ndarray:
    """The context channels of the bins of ``x`` between its halos.

    Parameters
    ----------
    x : (left + n + right, T) array
        Values of consecutive bins of one chromosome: ``left`` halo bins, the ``n`` bins
        wanted, ``right`` halo bins. A halo shorter than ``max(context)`` must end at the
        chromosome's end (windows are cut there).
    context : half-widths, as :func:`check` returns them.
    left, right : halo lengths in ``x``.

    Returns
    -------
    (n, T, 1 + len(context)) float32
        Channel 0 is the bin's value, channel ``i`` the mean over bins
        ``[k - h_i, k + h_i]`` that lie inside ``x``.
    """
    x = np.asarray(x)
    n = x.shape[0] - left - right
    if n < 0:
        raise ValueError(f"halos ({left}, {right}) are longer than the {x.shape[0]} bins")
    out = np.empty((n, x.shape[1], n_channels(context)), dtype=np.float32)
    out[:, :, 0] = x[left:left + n]
    if not context:
        return out
    k = np.arange(left, left + n)
    bounds = [(np.maximum(k - h, 0), np.minimum(k + h + 1, x.shape[0])) for h in context]
    # float64 running sums: float32 would lose the small values of a long window's mean.
    # A block of columns at a time: the sums and their differences are float64 arrays of
    # the window's length, and over all 1,000 tracks of a consortium they were 3 x 130 MB
    # per 16,384-bin chunk, held while the model computed the previous chunk.
    for j0 in range(0, x.shape[1], COLUMN_BLOCK):
        xj = x[:, j0:j0 + COLUMN_BLOCK]
        cs = np.zeros((x.shape[0] + 1, xj.shape[1]), dtype=np.float64)
        np.cumsum(xj, axis=0, dtype=np.float64, out=cs[1:])
        for i, (lo, hi) in enumerate(bounds, start=1):
            out[:, j0:j0 + COLUMN_BLOCK, i] = (cs[hi] - cs[lo]) / (hi - lo)[:, None]
    return out


def read_window(store: TrackStore, chrom: str, start: int, stop: int, columns,
                context: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Bins ``[start, stop)`` of ``chrom`` for ``columns``, with context channels.

    Returns
    -------
    (stop - start, len(columns), 1 + len(context)) array of ``dtype``.
    """
    h = read_halo(store, chrom, start, stop, columns, context)
    return window_means(h.data, context, h.left, h.right).astype(dtype, copy=False)


@dataclass(frozen=True)
class Halo:
    """The store's values of a run of bins with ``max(context)`` bins either side (cut at
    the chromosome's ends), in the store's dtype: 1 / (2 (1 + len(context))) of the
    memory of their context channels, which :meth:`channels` computes for any part.

    Attributes
    ----------
    data : (left + n + right, T) array
    left, right : halo lengths in ``data``.
    """

    data: np.ndarray
    left: int
    right: int

    @property
    def n(self) -> int:
        """Bins wanted (without the halos)."""
        return self.data.shape[0] - self.left - self.right

    def channels(self, context: tuple[int, ...], s0: int, s1: int) -> np.ndarray:
        """The model's input for wanted bins ``[s0, s1)``: (s1 - s0, T, 1 + len(context))
        float32 as :func:`window_means` gives it (equal to the whole run's rows s0:s1), or
        (s1 - s0, T) in the store's dtype without context."""
        a, b = self.left + s0, self.left + s1
        if not context:
            return self.data[a:b]
        h = max(context)
        lo, hi = max(0, a - h), min(self.data.shape[0], b + h)
        return window_means(self.data[lo:hi], context, a - lo, hi - b)


def read_halo(store: TrackStore, chrom: str, start: int, stop: int, columns,
              context: tuple[int, ...]) -> Halo:
    """Bins ``[start, stop)`` of ``chrom`` for ``columns`` with their halos (see :class:`Halo`)."""
    halo = max(context, default=0)
    lo, hi = max(0, start - halo), min(store.genome.n_bins(chrom), stop + halo)
    return Halo(store.read(chrom, lo, hi, columns, dtype=None), start - lo, hi - stop)
