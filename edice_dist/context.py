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
    # float64 running sums: float32 would lose the small values of a long window's mean.
    cs = np.zeros((x.shape[0] + 1, x.shape[1]), dtype=np.float64)
    np.cumsum(x, axis=0, dtype=np.float64, out=cs[1:])
    k = np.arange(left, left + n)
    for i, h in enumerate(context, start=1):
        lo = np.maximum(k - h, 0)
        hi = np.minimum(k + h + 1, x.shape[0])
        out[:, :, i] = (cs[hi] - cs[lo]) / (hi - lo)[:, None]
    return out


def read_window(store: TrackStore, chrom: str, start: int, stop: int, columns,
                context: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Bins ``[start, stop)`` of ``chrom`` for ``columns``, with context channels.

    Returns
    -------
    (stop - start, len(columns), 1 + len(context)) array of ``dtype``.
    """
    halo = max(context, default=0)
    lo, hi = max(0, start - halo), min(store.genome.n_bins(chrom), stop + halo)
    x = store.read(chrom, lo, hi, columns, dtype=None)
    return window_means(x, context, start - lo, hi - stop).astype(dtype, copy=False)
