"""Training and validation batches streamed from the track store.

Training (SPEC 2.5). Every epoch, the store's chunks are put in a seeded order that every
worker computes alike; worker ``r`` of ``w`` reads chunks ``r, r + w, r + 2w, ...`` of that
order itself (no data passes through the driver), a few chunks at a time, shuffles the bins
of those chunks together and cuts them into batches. Every bin of the training tracks is
used, background bins included (they are most of the genome and the model must predict them
too); bins are neither filtered nor reweighted. Per bin, a random subset of the training
tracks becomes targets and the rest are supports: the subset is the ``K`` smallest of a row
of uniform noise, which is a uniform random ``K``-subset, drawn for a whole batch at once.

Every worker yields the same number of full batches per epoch (the smallest share decides),
so DDP's collective calls always pair up; the few bins left over differ from epoch to epoch.
Memory per worker is ``shuffle_chunks x chunk_bins x n_tracks`` values, whatever the genome
length.

Validation. A fixed, seeded set of bins (the same every epoch) from a seeded subset of
chunks; each worker reads its own share once and keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .genome import Chunk
from .store import TrackStore

# Fixed stream ids so that the chunk order, the bin shuffle and the target draw never share
# random numbers, whatever the seed.
_ORDER, _SHUFFLE, _VAL = 0x0D3, 0x5F1, 0x7A1


@dataclass
class Batch:
    """One training batch.

    Attributes
    ----------
    x : (B, T) float32, values of the T input (training) columns.
    support : (B, T) bool, False where the column is a target at that bin.
    target : (B, K) int64, column index (into the T inputs) of each target.
    y : (B, K) float32, the targets' true values.
    """

    x: torch.Tensor
    support: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.x, self.support, self.target, self.y)))


def effective_n_targets(n_targets: int, n_columns: int, max_fraction: float) -> int:
    """Targets per bin: ``n_targets`` (paper: 120), but at most ``max_fraction`` of the
    training tracks so that small consortia keep most of their tracks as supports; at
    least one target and at least one support."""
    if n_columns < 2:
        raise ValueError("masking needs at least 2 training tracks")
    k = min(n_targets, int(np.floor(max_fraction * n_columns)))
    return int(min(max(k, 1), n_columns - 1))


def draw_targets(rng: np.random.Generator, n_rows: int, n_columns: int,
                 n_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of ``n_targets`` columns per row, vectorised.

    Returns
    -------
    target : (n_rows, n_targets) int64, distinct column indices per row.
    support : (n_rows, n_columns) bool, False at the targets.
    """
    if not 0 < n_targets < n_columns:
        raise ValueError(f"need 0 < n_targets ({n_targets}) < n_columns ({n_columns})")
    noise = rng.random((n_rows, n_columns), dtype=np.float32)
    target = np.argpartition(noise, n_targets - 1, axis=1)[:, :n_targets].astype(np.int64)
    support = np.ones((n_rows, n_columns), dtype=bool)
    np.put_along_axis(support, target, False, axis=1)
    return target, support


def split_pieces(chunks: list[Chunk], min_pieces: int) -> list[Chunk]:
    """Halve chunks until there are at least ``min_pieces`` of them (a tiny genome must
    still give every worker something to read). A piece stays inside one chunk."""
    pieces = list(chunks)
    while len(pieces) < min_pieces and any(p.n_bins > 1 for p in pieces):
        out = []
        for p in pieces:
            if p.n_bins > 1:
                mid = p.start + p.n_bins // 2
                out += [Chunk(p.chrom, p.index, p.start, mid), Chunk(p.chrom, p.index, mid, p.stop)]
            else:
                out.append(p)
        pieces = out
    return pieces


def epoch_pieces(pieces: list[Chunk], seed: int, epoch: int, rank: int,
                 world_size: int) -> list[Chunk]:
    """The pieces worker ``rank`` reads in ``epoch``, in reading order."""
    order = np.random.default_rng([seed, epoch, _ORDER]).permutation(len(pieces))
    return [pieces[i] for i in order[rank::world_size]]


def read_columns(store: TrackStore, chunk: Chunk, columns: np.ndarray) -> np.ndarray:
    """Bins of ``chunk`` for ``columns``, in the store's own dtype (float16 halves the
    shuffle buffer). Shape (chunk.n_bins, len(columns))."""
    data = np.asarray(store.array(chunk.chrom)[chunk.start:chunk.stop])
    return data[:, columns]


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
    shuffle_chunks : int
        Chunks read and shuffled together.
    """

    def __init__(self, store: TrackStore, columns, n_targets: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, bins_per_epoch: int | None = None,
                 shuffle_chunks: int = 4):
        self.columns = np.asarray(columns, dtype=np.int64)
        if self.columns.ndim != 1 or len(self.columns) < 2:
            raise ValueError("TrainSampler needs at least 2 training columns")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1 or shuffle_chunks < 1:
            raise ValueError("batch_size and shuffle_chunks must be positive")
        self.store = store
        self.n_targets = int(n_targets)
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.bins_per_epoch = bins_per_epoch
        self.shuffle_chunks = int(shuffle_chunks)
        self.pieces = split_pieces(store.chunks(), 4 * world_size)
        if self.steps(0) < 1:
            raise InputError(
                f"Store {store.path} has {store.genome.total_bins:,} bins: too few for "
                f"{world_size} worker(s) with batch_size {batch_size}. Lower batch_size or "
                "workers."
            )

    def steps(self, epoch: int) -> int:
        """Batches per worker in ``epoch`` (the same on every worker)."""
        shares = [sum(p.n_bins for p in epoch_pieces(self.pieces, self.seed, epoch, r,
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
        pieces = epoch_pieces(self.pieces, self.seed, epoch, self.rank, self.world_size)
        B, T = self.batch_size, len(self.columns)
        pool = np.empty((0, T), dtype=self.store.array(pieces[0].chrom).dtype if pieces else np.float32)
        done = 0
        for i in range(0, len(pieces), self.shuffle_chunks):
            if done == steps:
                return
            parts = [pool] + [read_columns(self.store, p, self.columns)
                              for p in pieces[i:i + self.shuffle_chunks]]
            pool = np.concatenate(parts)
            pool = pool[rng.permutation(len(pool))]
            n_full = min(len(pool) // B, steps - done)
            for j in range(n_full):
                x = pool[j * B:(j + 1) * B].astype(np.float32)
                target, support = draw_targets(rng, B, T, self.n_targets)
                y = np.take_along_axis(x, target, axis=1)
                yield Batch(torch.from_numpy(x), torch.from_numpy(support),
                            torch.from_numpy(target), torch.from_numpy(y))
            done += n_full
            pool = pool[n_full * B:]


def validation_plan(store: TrackStore, n_bins: int, seed: int) -> list[tuple[Chunk, np.ndarray]]:
    """A fixed, seeded set of about ``n_bins`` validation bins (all bins when the store has
    fewer), as (chunk, sorted bin offsets inside the chunk) pairs.

    To keep validation from reading the whole genome every epoch, the bins come from a
    seeded subset of chunks holding about four times ``n_bins`` bins.
    """
    chunks = store.chunks()
    rng = np.random.default_rng([seed, _VAL])
    order = rng.permutation(len(chunks))
    chosen, total = [], 0
    for i in order:
        if total >= 4 * n_bins:
            break
        chosen.append(chunks[i])
        total += chunks[i].n_bins
    chosen.sort(key=lambda c: (store.genome.chroms.index(c.chrom), c.start))
    take = min(n_bins, total)
    picks = np.sort(rng.choice(total, size=take, replace=False))
    bounds = np.cumsum([0] + [c.n_bins for c in chosen])
    plan = []
    for k, c in enumerate(chosen):
        lo, hi = np.searchsorted(picks, [bounds[k], bounds[k + 1]])
        if hi > lo:
            plan.append((c, picks[lo:hi] - bounds[k]))
    return plan


def read_validation(store: TrackStore, plan: list[tuple[Chunk, np.ndarray]], input_columns,
                    target_columns, rank: int = 0,
                    world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """This worker's share (chunks ``rank::world_size`` of ``plan``) of the validation bins.

    Returns
    -------
    x : (N, T) float32, the input (training) columns.
    y : (N, V) float32, the validation target columns.
    """
    cols = np.concatenate([np.asarray(input_columns), np.asarray(target_columns)]).astype(np.int64)
    n_in = len(input_columns)
    parts = [read_columns(store, c, cols)[offsets] for c, offsets in plan[rank::world_size]]
    data = (np.concatenate(parts) if parts else np.empty((0, len(cols)))).astype(np.float32)
    return data[:, :n_in], data[:, n_in:]


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
