"""Training and validation batches streamed from the track store.

Training (SPEC 2.5). A batch should look like independent draws from the whole training
genome: bins of one region share their chromatin state, so batches cut from a few
contiguous regions give correlated gradients, and an epoch that reads only a few regions
(``bins_per_epoch``) sees only part of the genome's states. Holding the genome in memory to
shuffle it is impossible at 124 M bins, so the sampler works in two levels:

1. **Blocks in a genome-wide random order.** The training genome is cut into blocks of
   ``block_bins`` bins (the store's inner chunk, so a block is one small read). Every epoch
   puts all blocks in a seeded order that every worker computes alike; worker ``r`` of ``w``
   reads blocks ``r, r + w, r + 2w, ...`` of that order itself (no data passes through the
   driver).
2. **A mixing buffer.** Blocks flow into a buffer of about ``buffer_bins`` bins. Each
   batch is drawn from the freshly shuffled buffer, and the buffer is topped up with new
   blocks once a quarter of it is used, so every batch mixes bins from about
   ``buffer_bins / block_bins`` regions spread over the whole genome (64 with the
   defaults), and consecutive batches share few regions.

Memory per worker is ``buffer_bins x n_tracks`` values whatever the genome length, and an
epoch reads only the blocks it uses (plus one buffer fill). Every bin of the training
tracks is used, background bins included (they are most of the genome and the model must
predict them too); bins are neither filtered nor reweighted. Per bin, a random subset of
the training tracks becomes targets and the rest are supports: the subset is the ``K``
smallest of a row of uniform noise, which is a uniform random ``K``-subset, drawn for a
whole batch at once.

Every worker yields the same number of full batches per epoch (the smallest share
decides), so DDP's collective calls always pair up.

Validation. A fixed, seeded set of bins (the same every epoch): a few bins from each of
many random blocks across the whole genome, so that the validation loss averages over the
genome's states rather than a few regions. Each worker reads its own share once and keeps
it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .context import read_halo, read_window
from .errors import InputError
from .genome import Chunk
from .store import TrackStore

# Fixed stream ids so that the block order, the bin shuffle and the target draw never share
# random numbers, whatever the seed.
_ORDER, _SHUFFLE, _VAL = 0x0D3, 0x5F1, 0x7A1

BUFFER_BINS = 65536
"""Bins in the mixing buffer: 64 blocks of 1024 bins, ~16 MB per 100 float16 tracks."""
VAL_BINS_PER_BLOCK = 64
"""Validation bins taken from each chosen block: many regions, few bins from each."""


@dataclass
class Batch:
    """One training batch.

    Attributes
    ----------
    x : (B, T) float32, values of the T input (training) columns; (B, T, C) with the C
        context channels of a model that has them (:mod:`edice_dist.context`).
    support : (B, T) bool, False where the column is a target at that bin.
    target : (B, K) int64, column index (into the T inputs) of each target.
    y : (B, K) float32, the targets' true values.
    near : (B, K) float32, optional
        The larger of each target's values at the two bins next to it (the one inside at a
        chromosome's end): a view of the signal around a bin without the bin's own noise
        (``peak_by=neighbours``). None unless the sampler was asked for it.
    """

    x: torch.Tensor
    support: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor
    near: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in
                       (self.x, self.support, self.target, self.y, self.near)))


def effective_n_targets(n_targets: int, n_columns: int, max_fraction: float) -> int:
    """Targets per bin: ``n_targets`` (paper: 120), but at most ``max_fraction`` of the
    training tracks so that small consortia keep most of their tracks as supports; at
    least one target and at least one support."""
    if n_columns < 2:
        raise ValueError("masking needs at least 2 training tracks")
    k = min(n_targets, int(np.floor(max_fraction * n_columns)))
    return int(min(max(k, 1), n_columns - 1))


def draw_targets(rng: np.random.Generator, n_rows: int, n_columns: int,
                 n_targets: int, allowed: np.ndarray | None = None,
                 cells: np.ndarray | None = None,
                 mask_cells: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of ``n_targets`` columns per row, vectorised.

    Parameters
    ----------
    allowed : (n_columns,) bool, optional
        The columns that may be targets (all when None); the others are always supports.
        The draw is the same as without it where every column is allowed.
    cells : (n_columns,) int, optional
        The cell of each column, for ``mask_cells``.
    mask_cells : float
        Share of the rows at which every column of one random cell is a target (up to
        ``n_targets`` of them), the rest of the targets drawn as usual: the model then
        sees cells with no support, as a cell type never measured is at imputation.
        Only cells whose columns may all be targets are picked. With 0 the draw is
        exactly the one without it.

    Returns
    -------
    target : (n_rows, n_targets) int64, distinct column indices per row.
    support : (n_rows, n_columns) bool, False at the targets.
    """
    if not 0 < n_targets < n_columns:
        raise ValueError(f"need 0 < n_targets ({n_targets}) < n_columns ({n_columns})")
    noise = rng.random((n_rows, n_columns), dtype=np.float32)
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if int(allowed.sum()) < n_targets:
            raise ValueError(f"{n_targets} targets per row but only {int(allowed.sum())} "
                             "columns may be targets")
        noise[:, ~allowed] = 2.0  # uniform noise is < 1: never among the smallest
    if mask_cells > 0:
        cells = np.asarray(cells)
        blocked = np.unique(cells[~allowed]) if allowed is not None else []
        eligible = np.setdiff1d(np.unique(cells), blocked)
        if len(eligible):
            rows = rng.random(n_rows) < mask_cells
            pick = eligible[rng.integers(len(eligible), size=n_rows)]
            # Below the others' [0, 1) noise: the whole cell is drawn first.
            noise[rows[:, None] & (cells[None, :] == pick[:, None])] -= 1.0
    target = np.argpartition(noise, n_targets - 1, axis=1)[:, :n_targets].astype(np.int64)
    support = np.ones((n_rows, n_columns), dtype=bool)
    np.put_along_axis(support, target, False, axis=1)
    return target, support


def genome_blocks(store: TrackStore, block_bins: int, min_blocks: int = 1) -> list[Chunk]:
    """The training genome cut into blocks of ``block_bins`` bins (aligned inside each
    chromosome; the last block of a chromosome is shorter), in genome order.

    Blocks are halved until there are at least ``min_blocks`` of them, so that a tiny
    genome still gives every worker something to read. ``Chunk.index`` is the block's
    position along its chromosome at the original size.
    """
    if block_bins < 1:
        raise ValueError("block_bins must be positive")
    blocks = store.genome.chunks(block_bins)
    while len(blocks) < min_blocks and any(b.n_bins > 1 for b in blocks):
        out = []
        for b in blocks:
            if b.n_bins > 1:
                mid = b.start + b.n_bins // 2
                out += [Chunk(b.chrom, b.index, b.start, mid), Chunk(b.chrom, b.index, mid, b.stop)]
            else:
                out.append(b)
        blocks = out
    return blocks


def epoch_blocks(blocks: list[Chunk], seed: int, epoch: int, rank: int,
                 world_size: int) -> list[Chunk]:
    """The blocks worker ``rank`` reads in ``epoch``, in reading order."""
    order = np.random.default_rng([seed, epoch, _ORDER]).permutation(len(blocks))
    return [blocks[i] for i in order[rank::world_size]]


def read_columns(store: TrackStore, block: Chunk, columns: np.ndarray,
                 context: tuple[int, ...] = ()) -> np.ndarray:
    """Bins of ``block`` for ``columns``, in the store's own dtype (float16 halves the
    mixing buffer). Shape (block.n_bins, len(columns)), or (block.n_bins, len(columns),
    1 + len(context)) with context channels."""
    if context:
        return read_window(store, block.chrom, block.start, block.stop, columns, context,
                           dtype=store.array(block.chrom).dtype)
    return store.read(block.chrom, block.start, block.stop, columns, dtype=None)


def read_neighbours(store: TrackStore, block: Chunk, columns: np.ndarray,
                    context: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_columns` of ``block`` in one read, with each bin's larger neighbour.

    Returns
    -------
    rows : as :func:`read_columns`.
    near : (block.n_bins, len(columns)) in the store's dtype, the larger of the values of
        the bins just before and after each bin; the one that exists at a chromosome's end
        (the bin's own on a chromosome of one bin).
    """
    h = read_halo(store, block.chrom, block.start, block.stop, columns, context or (1,))
    d = h.data
    rows = h.channels(context, 0, h.n).astype(d.dtype, copy=False)
    i = np.arange(h.left, h.left + h.n)
    # The halo is cut at the chromosome's ends only, so a missing neighbour is one there.
    before = np.where(i > 0, i - 1, np.minimum(i + 1, len(d) - 1))
    after = np.where(i < len(d) - 1, i + 1, np.maximum(i - 1, 0))
    return rows, np.maximum(d[before], d[after])


class TrainSampler:
    """Streams training batches of one worker.

    Parameters
    ----------
    store : TrackStore
    columns : (T,) int, the store columns that are training tracks (inputs and targets).
    n_targets : int
        Targets per bin (already capped; see :func:`effective_n_targets`).
    batch_size : int
        Bins per batch on this worker.
    seed : int
    rank, world_size : int
        This worker and the number of workers.
    bins_per_epoch : int, optional
        Cap on the bins of one epoch over all workers (all training bins when None).
    buffer_bins : int
        Bins in the mixing buffer (see the module docstring).
    block_bins : int, optional
        Bins per read; the store's inner chunk when None.
    context : tuple of int
        The model's context half-widths: batches then carry the window means too.
    targets : (T,) bool, optional
        Which of ``columns`` may be targets (all when None); the others are supports at
        every bin (fine-tuning on one individual's tracks with the others as inputs).
    cells, mask_cells : see :func:`draw_targets` (``cells`` per training column).
    neighbours : bool
        Batches also carry each target's larger neighbour (:attr:`Batch.near`); the rows,
        targets and random draws are the same with and without it.
    """

    def __init__(self, store: TrackStore, columns, n_targets: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, bins_per_epoch: int | None = None,
                 buffer_bins: int = BUFFER_BINS, block_bins: int | None = None,
                 context: tuple[int, ...] = (), targets=None, cells=None,
                 mask_cells: float = 0.0, neighbours: bool = False):
        self.columns = np.asarray(columns, dtype=np.int64)
        if mask_cells and (cells is None or len(cells) != len(self.columns)):
            raise ValueError("mask_cells needs the cell of each training column")
        self.cells = None if cells is None else np.asarray(cells, dtype=np.int64)
        self.mask_cells = float(mask_cells)
        if self.columns.ndim != 1 or len(self.columns) < 2:
            raise ValueError("TrainSampler needs at least 2 training columns")
        self.targets = None if targets is None else np.asarray(targets, dtype=bool)
        if self.targets is not None and self.targets.shape != self.columns.shape:
            raise ValueError("targets must flag each training column")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1 or buffer_bins < 1:
            raise ValueError("batch_size and buffer_bins must be positive")
        self.store = store
        self.n_targets = int(n_targets)
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.bins_per_epoch = bins_per_epoch
        self.buffer_bins = max(int(buffer_bins), 2 * self.batch_size)
        self.block_bins = int(block_bins or store.block_bins)
        self.context = tuple(context)
        self.neighbours = bool(neighbours)
        self.blocks = genome_blocks(store, self.block_bins, 4 * world_size)
        if self.steps(0) < 1:
            raise InputError(
                f"Store {store.path} has {store.genome.total_bins:,} bins: too few for "
                f"{world_size} worker(s) with batch_size {batch_size}. Lower batch_size or "
                "workers."
            )

    def steps(self, epoch: int) -> int:
        """Batches per worker in ``epoch`` (the same on every worker)."""
        shares = [sum(b.n_bins for b in epoch_blocks(self.blocks, self.seed, epoch, r,
                                                     self.world_size))
                  for r in range(self.world_size)]
        steps = min(shares) // self.batch_size
        if self.bins_per_epoch:
            steps = min(steps, max(1, self.bins_per_epoch // (self.batch_size * self.world_size)))
        return steps

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This worker's batches of ``epoch``: exactly :meth:`steps` full batches."""
        steps = self.steps(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank, _SHUFFLE])
        blocks = iter(epoch_blocks(self.blocks, self.seed, epoch, self.rank, self.world_size))
        B, T = self.batch_size, len(self.columns)
        # Never hold more than the epoch still needs: a short epoch reads fewer blocks.
        capacity = min(self.buffer_bins, steps * B)
        low = capacity - max(B, capacity // 4)  # top up once a quarter is used
        # The buffer's rows stay where they were read; ``order`` lists the pool's rows
        # (slots of ``buf``) in mixing order and each top-up permutes only it. Shuffling
        # the rows themselves held three copies of the buffer of all tracks at each
        # top-up (1.5 GB at 1,000 tracks and 65,536 bins).
        width = (T, 1 + len(self.context)) if self.context else (T,)
        buf = np.empty((capacity + max(b.n_bins for b in self.blocks), *width),
                       dtype=self.store.array(self.blocks[0].chrom).dtype)
        # 1 / (1 + len(context)) more memory, only for the rule that needs it.
        near = np.empty(buf.shape[:2], dtype=buf.dtype) if self.neighbours else None
        order = np.empty(0, dtype=np.int64)
        free = np.arange(len(buf))  # slots not in the pool, reused from the front
        exhausted = False
        for _ in range(steps):
            if len(order) <= max(low, B - 1) and not exhausted:
                n = len(order)
                for block in blocks:
                    if near is None:
                        rows = read_columns(self.store, block, self.columns, self.context)
                    else:
                        rows, nb = read_neighbours(self.store, block, self.columns,
                                                   self.context)
                    slots, free = free[:len(rows)], free[len(rows):]
                    buf[slots] = rows
                    if near is not None:
                        near[slots] = nb
                    order = np.concatenate([order, slots])
                    n += block.n_bins
                    if n >= capacity:
                        break
                else:
                    exhausted = True
                order = order[rng.permutation(len(order))]
            picked = order[-B:]
            x = buf[picked].astype(np.float32)
            free = np.concatenate([free, picked])
            order = order[:-B]
            target, support = draw_targets(rng, B, T, self.n_targets, self.targets,
                                           self.cells, self.mask_cells)
            y = np.take_along_axis(x[..., 0] if self.context else x, target, axis=1)
            nt = None if near is None else torch.from_numpy(
                np.take_along_axis(near[picked], target, axis=1).astype(np.float32))
            yield Batch(torch.from_numpy(x), torch.from_numpy(support),
                        torch.from_numpy(target), torch.from_numpy(y), nt)


def validation_plan(store: TrackStore, n_bins: int, seed: int,
                    block_bins: int | None = None) -> list[tuple[Chunk, np.ndarray]]:
    """A fixed, seeded set of about ``n_bins`` validation bins drawn genome-wide (all bins
    when the store has fewer), as (block, sorted bin offsets inside the block) pairs in
    genome order.

    The bins come from many random blocks, :data:`VAL_BINS_PER_BLOCK` from each, so that
    validation reads few blocks yet covers the genome's states.
    """
    blocks = genome_blocks(store, int(block_bins or store.block_bins))
    total = sum(b.n_bins for b in blocks)
    if n_bins >= total:
        return [(b, np.arange(b.n_bins)) for b in blocks]
    rng = np.random.default_rng([seed, _VAL])
    n_blocks = min(len(blocks), -(-n_bins // VAL_BINS_PER_BLOCK))
    chosen = sorted(rng.choice(len(blocks), size=n_blocks, replace=False))
    sizes = np.array([blocks[i].n_bins for i in chosen])
    # Spread n_bins over the chosen blocks in proportion to their size, no block overfull.
    take = np.minimum(sizes, np.floor(n_bins * sizes / sizes.sum()).astype(int))
    for i in rng.permutation(len(chosen)):
        if take.sum() >= n_bins:
            break
        take[i] += min(sizes[i] - take[i], n_bins - take.sum())
    plan = []
    for i, k in zip(chosen, take, strict=True):
        if k > 0:
            plan.append((blocks[i], np.sort(rng.choice(blocks[i].n_bins, size=k, replace=False))))
    return plan


def read_validation(store: TrackStore, plan: list[tuple[Chunk, np.ndarray]], input_columns,
                    target_columns, rank: int = 0, world_size: int = 1,
                    context: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """This worker's share (blocks ``rank::world_size`` of ``plan``) of the validation bins.

    Returns
    -------
    x : (N, T), the input (training) columns in the store's dtype (float16: half the
        memory of float32, and the values and window means the training batches carry);
        (N, T, C) with context channels.
    y : (N, V) float32, the validation target columns.
    """
    cols = np.concatenate([np.asarray(input_columns), np.asarray(target_columns)]).astype(np.int64)
    n_in = len(input_columns)
    shape = (0, len(cols), 1 + len(context)) if context else (0, len(cols))
    parts = [read_columns(store, c, cols, context)[offsets] for c, offsets in plan[rank::world_size]]
    data = np.concatenate(parts) if parts else np.empty(shape, dtype=np.float32)
    del parts
    y = np.array(data[:, n_in:, 0] if context else data[:, n_in:], dtype=np.float32)
    return np.ascontiguousarray(data[:, :n_in]), y


def avg_weights(input_cells, input_assays, target_cells, target_assays) -> np.ndarray:
    """The AVG baseline as a matrix: prediction = x @ W, the mean of the target's assay over
    the input tracks of other cells (0 when no other cell has that assay).

    Returns
    -------
    (T, V) float32.
    """
    ic, ia = np.asarray(input_cells)[:, None], np.asarray(input_assays)[:, None]
    tc, ta = np.asarray(target_cells)[None, :], np.asarray(target_assays)[None, :]
    w = ((ia == ta) & (ic != tc)).astype(np.float64)
    n = w.sum(axis=0, keepdims=True)
    return (w / np.maximum(n, 1)).astype(np.float32)
