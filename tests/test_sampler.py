"""Training batches from the store: coverage, genome-wide mixing, bounded memory, masking,
validation bins."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from trainstore import make_store

from edice_dist import storage
from edice_dist import store as store_mod
from edice_dist.errors import InputError
from edice_dist.genome import Chunk
from edice_dist.sampler import (
    _SHUFFLE,
    TrainSampler,
    avg_weights,
    draw_targets,
    effective_n_targets,
    epoch_blocks,
    genome_blocks,
    read_columns,
    read_validation,
    validation_plan,
)
from edice_dist.trainloop import peak_level


def _indexed_store(path: str, **kw):
    """A float32 store whose column 0 holds each bin's genome-wide index, so that every
    sampled row can be traced back to its bin; column 1 its chromosome number. Returns the
    open store and {chrom: (n_bins, T) values}."""
    st, truth = make_store(path, **kw)
    root = zarr.open_group(storage.zarr_store(path), mode="r+")
    off = 0
    for i, c in enumerate(st.genome.chroms):
        n = st.genome.n_bins(c)
        arr = root["signal"][store_mod.array_key(c, i)]
        data = np.asarray(arr[:])
        data[:, 0] = np.arange(off, off + n)
        data[:, 1] = i
        arr[:] = data
        truth[c] = data
        off += n
    return store_mod.open_store(path), truth


@pytest.fixture(scope="module")
def bin_store(tmp_path_factory):
    return _indexed_store(str(tmp_path_factory.mktemp("sampler") / "store"), n_cells=4,
                          n_assays=3, chrom_bins=(2100, 1337, 50), chunk_bins=256,
                          splits={(1, 1): "val", (2, 0): "test"})


def _genome_table(st, truth):
    return np.concatenate([truth[c] for c in st.genome.chroms])


def test_draw_targets_is_a_uniform_subset_per_row():
    rng = np.random.default_rng(0)
    target, support = draw_targets(rng, 4000, 10, 3)
    assert target.shape == (4000, 3) and support.shape == (4000, 10)
    assert all(len(set(row)) == 3 for row in target)
    # Support is exactly the complement of the targets.
    mask = np.zeros_like(support)
    np.put_along_axis(mask, target, True, axis=1)
    assert np.array_equal(support, ~mask)
    # Each column is a target in ~3/10 of the rows (binomial sd ~0.007).
    freq = mask.mean(axis=0)
    assert np.all(np.abs(freq - 0.3) < 0.035)
    # Pairs are as often together as a uniform subset gives: P = 3*2/(10*9).
    both = (mask[:, 0] & mask[:, 1]).mean()
    assert abs(both - 6 / 90) < 0.02
    with pytest.raises(ValueError):
        draw_targets(rng, 2, 3, 3)


def test_draw_targets_only_from_the_allowed_columns():
    allowed = np.array([True, False, True, True, False, True])
    target, support = draw_targets(np.random.default_rng(1), 500, 6, 2, allowed)
    assert set(target.ravel()) == {0, 2, 3, 5} and support[:, [1, 4]].all()
    # All allowed: the same draw as without a mask.
    a = draw_targets(np.random.default_rng(2), 50, 6, 2, np.ones(6, bool))
    b = draw_targets(np.random.default_rng(2), 50, 6, 2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="may be targets"):
        draw_targets(np.random.default_rng(3), 2, 6, 3, allowed & (np.arange(6) < 3))


def test_mask_cells_hides_whole_cells_at_the_asked_share_of_rows():
    """Cells 0..3 with 3, 2, 3, 2 columns; 4 targets per row. At about 30 % of the rows
    one whole cell has no support left; elsewhere (and with mask_cells 0) whole cells go
    unsupported only as often as a uniform draw makes them."""
    cells = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    n = 20000

    def whole_cell_rows(support, only=None):
        rows = np.zeros(len(support), bool)
        for c in np.unique(cells) if only is None else only:
            rows |= ~support[:, cells == c].any(axis=1)
        return rows

    _, plain = draw_targets(np.random.default_rng(4), n, 10, 4)
    base = whole_cell_rows(plain).mean()
    _, masked = draw_targets(np.random.default_rng(4), n, 10, 4, cells=cells, mask_cells=0.3)
    got = whole_cell_rows(masked).mean()
    # P(row masked) = 0.3 + 0.7 * (chance a uniform draw of the rest empties a cell).
    assert abs(got - (0.3 + 0.7 * base)) < 0.02 and got > base + 0.15
    # mask_cells 0: the same draw as without cells.
    a = draw_targets(np.random.default_rng(5), 50, 10, 4, cells=cells, mask_cells=0.0)
    b = draw_targets(np.random.default_rng(5), 50, 10, 4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # Only cells whose columns may all be targets are hidden whole: cell 1 has a
    # support-only column, so it is never emptied; the others are, about equally.
    allowed = np.ones(10, bool)
    allowed[4] = False
    _, m2 = draw_targets(np.random.default_rng(6), n, 10, 4, allowed, cells, 0.9)
    assert m2[:, 4].all()
    shares = [whole_cell_rows(m2, [c]).mean() for c in (0, 2, 3)]
    assert min(shares) > 0.25 and max(shares) - min(shares) < 0.05


def test_effective_n_targets_caps_to_a_fraction():
    assert effective_n_targets(120, 1014, 0.5) == 120  # paper scale: as asked
    assert effective_n_targets(120, 55, 0.5) == 27  # small consortium: half at most
    assert effective_n_targets(120, 2, 0.5) == 1
    assert effective_n_targets(120, 3, 0.1) == 1  # at least one target
    assert effective_n_targets(5, 40, 0.5) == 5
    with pytest.raises(ValueError):
        effective_n_targets(1, 1, 0.5)


def test_genome_blocks_tile_the_genome_and_split_for_workers(bin_store):
    st, _ = bin_store
    for block_bins, least in ((100, 1), (4096, 8), (4096, 200)):
        blocks = genome_blocks(st, block_bins, least)
        assert len(blocks) >= min(least, st.genome.total_bins)
        for chrom in st.genome.chroms:
            covered = np.zeros(st.genome.n_bins(chrom), int)
            for b in blocks:
                if b.chrom == chrom:
                    assert 0 < b.n_bins <= block_bins
                    covered[b.start:b.stop] += 1
            assert (covered == 1).all()
    assert all(isinstance(b, Chunk) for b in blocks)


def test_epoch_covers_disjoint_bins_across_workers(bin_store):
    st, truth = bin_store
    table = _genome_table(st, truth)
    cols = st.split_indices("train")
    world, B = 3, 32
    samplers = [TrainSampler(st, cols, 2, B, seed=4, rank=r, world_size=world,
                             buffer_bins=300, block_bins=64) for r in range(world)]
    steps = samplers[0].steps(0)
    assert all(s.steps(0) == steps for s in samplers)
    seen = []
    for s in samplers:
        batches = list(s.batches(0))
        assert len(batches) == steps  # every worker the same number of full batches
        for b in batches:
            assert b.x.shape == (B, len(cols)) and b.target.shape == (B, 2)
            ids = b.x[:, 0].numpy().astype(np.int64)
            # Rows are the store's values of those bins, training columns only.
            np.testing.assert_array_equal(b.x.numpy(), table[ids][:, cols])
            np.testing.assert_array_equal(b.y.numpy(),
                                          np.take_along_axis(b.x.numpy(), b.target.numpy(), 1))
            assert (b.support.sum(1) == len(cols) - 2).all()
            seen.append(ids)
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen)  # no bin twice in an epoch
    total = st.genome.total_bins
    # The smallest share decides; at most a few blocks per worker are left over.
    assert len(seen) > total - world * (2 * 64 + B)
    # Bins come from all chromosomes.
    assert set(np.unique(table[seen, 1]).astype(int)) == {0, 1, 2}


@pytest.mark.parametrize("context", [(), (4, 20)])
def test_neighbours_are_each_target_s_adjacent_bins(tmp_path, context):
    """``near`` is the larger of a target's values at the bins before and after it, read
    across block edges and cut at chromosome ends (the one neighbour there; a chromosome of
    one bin has none but itself), computed here with numpy from the store's values; the
    rows, targets and values are those of a sampler without it."""
    st, truth = _indexed_store(str(tmp_path / "store"), n_cells=4, n_assays=3,
                               chrom_bins=(700, 333, 1), chunk_bins=128,
                               splits={(1, 1): "val", (2, 0): "test"})
    cols = st.split_indices("train")
    rng = np.random.default_rng(2)
    parts = []
    for c in st.genome.chroms:
        d = truth[c][:, cols].astype(np.float64)
        d[:, 2:] = rng.normal(size=d[:, 2:].shape)  # noise: the larger side varies
        truth[c][:, cols[2:]] = d[:, 2:]
        if len(d) == 1:
            parts.append(d)
            continue
        before = np.vstack([d[1:2], d[:-1]])
        after = np.vstack([d[1:], d[-2:-1]])
        parts.append(np.maximum(before, after))
    _rewrite(st, truth)
    near = np.concatenate(parts)
    kw = dict(buffer_bins=300, block_bins=64, context=context)
    with_near = TrainSampler(st, cols, 2, 32, seed=3, neighbours=True, **kw)
    plain = TrainSampler(st, cols, 2, 32, seed=3, **kw)
    n = 0
    for b, p in zip(with_near.batches(0), plain.batches(0), strict=True):
        x = b.x.numpy()
        ids = (x[:, 0, 0] if context else x[:, 0]).astype(np.int64)
        np.testing.assert_allclose(b.near.numpy(),
                                   np.take_along_axis(near[ids], b.target.numpy(), 1),
                                   rtol=1e-6)
        assert p.near is None
        if not context:  # no window: ``neighbours`` is the adjacent bins, ``either`` ``bin``
            assert peak_level(b, "either") is None
            np.testing.assert_array_equal(peak_level(b, "neighbours").numpy(), b.near.numpy())
        np.testing.assert_array_equal(x, p.x.numpy())
        np.testing.assert_array_equal(b.target.numpy(), p.target.numpy())
        n += 1
    assert n == with_near.steps(0) > 10
    # Chromosome ends and block edges (every 64th bin) were among the rows drawn.
    assert {0, 699, 700, 1032, 1033} <= set(ids_all(with_near, context))


def _rewrite(st, truth) -> None:
    """Write ``truth`` back into ``st``'s arrays."""
    root = zarr.open_group(storage.zarr_store(st.path), mode="r+")
    for i, c in enumerate(st.genome.chroms):
        root["signal"][store_mod.array_key(c, i)][:] = truth[c]


def ids_all(sampler, context) -> np.ndarray:
    """The genome-wide index of every row of ``sampler``'s epoch 0."""
    return np.concatenate([(b.x[:, 0, 0] if context else b.x[:, 0]).numpy().astype(np.int64)
                           for b in sampler.batches(0)])


def test_held_out_tracks_are_never_read_as_training_columns(bin_store):
    st, truth = bin_store
    cols = st.split_indices("train")
    held = set(st.split_indices("val", "test").tolist())
    assert held and not held & set(cols.tolist())
    table = _genome_table(st, truth)
    s = TrainSampler(st, cols, 3, 64, seed=0)
    b = next(iter(s.batches(0)))
    ids = b.x[:, 0].numpy().astype(np.int64)
    for h in held:  # no training column equals a held-out track
        assert not any(np.array_equal(b.x[:, j].numpy(), table[ids, h]) for j in range(len(cols)))


def test_batches_are_seeded_and_change_per_epoch(bin_store):
    st, _ = bin_store
    cols = st.split_indices("train")
    a = TrainSampler(st, cols, 2, 16, seed=9, bins_per_epoch=200)
    b = TrainSampler(st, cols, 2, 16, seed=9, bins_per_epoch=200)
    ea, eb = list(a.batches(1)), list(b.batches(1))
    assert len(ea) == 200 // 16
    for u, v in zip(ea, eb, strict=True):
        assert np.array_equal(u.x.numpy(), v.x.numpy())
        assert np.array_equal(u.target.numpy(), v.target.numpy())
    e2 = list(a.batches(2))
    assert not np.array_equal(ea[0].x.numpy(), e2[0].x.numpy())
    c = TrainSampler(st, cols, 2, 16, seed=10, bins_per_epoch=200)
    assert not np.array_equal(ea[0].x.numpy(), next(iter(c.batches(1))).x.numpy())


def _shuffled_pool_batches(sampler, epoch):
    """The mixing buffer as a list of rows: top up with whole blocks, shuffle every row,
    take batches from the end (what the sampler's slots of a fixed buffer must equal)."""
    steps, B, T = sampler.steps(epoch), sampler.batch_size, len(sampler.columns)
    rng = np.random.default_rng([sampler.seed, epoch, sampler.rank, _SHUFFLE])
    blocks = iter(epoch_blocks(sampler.blocks, sampler.seed, epoch, sampler.rank,
                               sampler.world_size))
    capacity = min(sampler.buffer_bins, steps * B)
    low = capacity - max(B, capacity // 4)
    pool, exhausted, out = np.empty((0, T)), False, []
    for _ in range(steps):
        if len(pool) <= max(low, B - 1) and not exhausted:
            parts = [pool]
            for block in blocks:
                parts.append(read_columns(sampler.store, block, sampler.columns))
                if sum(len(p) for p in parts) >= capacity:
                    break
            else:
                exhausted = True
            pool = np.concatenate(parts)
            pool = pool[rng.permutation(len(pool))]
        x, pool = pool[-B:], pool[:-B]
        target, _ = draw_targets(rng, B, T, sampler.n_targets)
        out.append((x, target))
    return out


@pytest.mark.parametrize("buffer_bins", [40, 130, 5000])
def test_mixing_buffer_draws_what_a_shuffled_pool_would(bin_store, buffer_bins):
    """Top-ups part-way through, a buffer smaller than a block, and one over the epoch."""
    st, _ = bin_store
    s = TrainSampler(st, st.split_indices("train"), 2, 16, seed=4, block_bins=100,
                     buffer_bins=buffer_bins, bins_per_epoch=800)
    got, want = list(s.batches(3)), _shuffled_pool_batches(s, 3)
    assert len(got) == len(want) == 800 // 16
    for batch, (x, target) in zip(got, want, strict=True):
        np.testing.assert_array_equal(batch.x.numpy(), x)
        np.testing.assert_array_equal(batch.target.numpy(), target)
    ids = np.concatenate([b.x.numpy()[:, 0] for b in got])
    assert len(np.unique(ids)) == len(ids)  # no bin drawn twice within an epoch


def test_sampler_reads_one_block_at_a_time(bin_store, monkeypatch):
    """Streaming: every read is one block, never a chromosome."""
    st, _ = bin_store
    sizes = []
    orig = st.array

    class Spy:
        def __init__(self, arr):
            self.arr = arr

        def __getitem__(self, key):
            out = self.arr[key]
            sizes.append(out.shape[0])
            return out

        @property
        def dtype(self):
            return self.arr.dtype

    monkeypatch.setattr(st, "array", lambda chrom: Spy(orig(chrom)))
    s = TrainSampler(st, st.split_indices("train"), 2, 64, seed=1, block_bins=100)
    n = sum(1 for _ in s.batches(0))
    assert n > 0 and sizes and max(sizes) <= 100


def test_too_small_genome_is_a_clear_error(tmp_path):
    st, _ = make_store(str(tmp_path / "s"), chrom_bins=(40,), chunk_bins=16)
    with pytest.raises(InputError, match="too few"):
        TrainSampler(st, st.split_indices("train"), 2, 64, seed=0, world_size=2)


def test_validation_plan_is_fixed_and_shared_out(bin_store):
    st, truth = bin_store
    table = _genome_table(st, truth)
    plan = validation_plan(st, 300, seed=3)
    again = validation_plan(st, 300, seed=3)
    assert [(c, o.tolist()) for c, o in plan] == [(c, o.tolist()) for c, o in again]
    n = sum(len(o) for _, o in plan)
    assert n == 300
    inputs, targets = st.split_indices("train"), st.split_indices("val")
    xs, ys = [], []
    for r in range(2):
        x, y = read_validation(st, plan, inputs, targets, rank=r, world_size=2)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert len(x) == 300
    ids = x[:, 0].astype(np.int64)
    assert len(np.unique(ids)) == 300
    np.testing.assert_array_equal(x, table[ids][:, inputs])
    np.testing.assert_array_equal(y, table[ids][:, targets])
    # More than the genome: all of it.
    assert sum(len(o) for _, o in validation_plan(st, 10**6, seed=3)) == st.genome.total_bins


def test_avg_weights_match_a_loop():
    rng = np.random.default_rng(0)
    ic, ia = rng.integers(0, 5, 12), rng.integers(0, 3, 12)
    tc, ta = np.array([0, 1, 4]), np.array([2, 0, 1])
    x = rng.random((7, 12))
    got = x @ avg_weights(ic, ia, tc, ta)
    for v in range(3):
        others = [t for t in range(12) if ia[t] == ta[v] and ic[t] != tc[v]]
        want = x[:, others].mean(axis=1) if others else np.zeros(7)
        np.testing.assert_allclose(got[:, v], want, rtol=1e-5)


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    """A 600,000-bin genome (39 store chunks of 16,384 bins), column 0 each bin's index."""
    return _indexed_store(str(tmp_path_factory.mktemp("wide") / "store"), n_cells=2,
                          n_assays=2, chrom_bins=(300_000, 200_000, 100_000),
                          chunk_bins=16384)[0]


def _regions(st, ids, region_bins=16384):
    """Distinct store chunks (~400 kbp regions) that bins ``ids`` fall in."""
    starts = np.cumsum([0] + [st.genome.n_bins(c) for c in st.genome.chroms])
    chrom = np.searchsorted(starts, ids, side="right") - 1
    return set(zip(chrom.tolist(), ((ids - starts[chrom]) // region_bins).tolist(), strict=True))


def test_batches_mix_regions_from_the_whole_genome(wide_store):
    """A batch must look like independent draws from the genome, not a few regions: the
    former sampler (4 store chunks shuffled together) gave at most 4 regions per batch,
    and an epoch of 10 % of the bins saw 4 of the 39 regions."""
    st = wide_store
    n_regions = len(_regions(st, np.arange(st.genome.total_bins)))
    assert n_regions == 39
    s = TrainSampler(st, st.split_indices("train"), 1, 256, seed=2, bins_per_epoch=60_000)
    per_batch, epoch = [], set()
    for b in s.batches(1):
        ids = b.x[:, 0].numpy().astype(np.int64)
        regions = _regions(st, ids)
        per_batch.append(len(regions))
        epoch |= regions
    assert len(per_batch) == 60_000 // 256
    assert min(per_batch) >= 16 and np.mean(per_batch) >= 20
    assert len(epoch) >= 30  # a short epoch still sees most of the genome
    # Consecutive batches are not the same few regions over and over.
    b0, b1 = list(s.batches(1))[:2]
    shared = _regions(st, b0.x[:, 0].numpy().astype(np.int64)) & _regions(
        st, b1.x[:, 0].numpy().astype(np.int64))
    assert len(shared) < 0.9 * n_regions


def test_sampler_memory_is_flat_in_genome_length(wide_store, tmp_path, monkeypatch):
    """The rows held at once depend on the buffer, not on the genome: a genome 6x longer
    holds no more."""
    small, _ = make_store(str(tmp_path / "small"), n_cells=2, n_assays=2,
                          chrom_bins=(100_000,), chunk_bins=16384)
    real_concat = np.concatenate
    held = []

    def spy(parts, *a, **k):
        out = real_concat(parts, *a, **k)
        held[-1] = max(held[-1], len(out))
        return out

    monkeypatch.setattr(np, "concatenate", spy)
    for st in (small, wide_store):
        held.append(0)
        s = TrainSampler(st, st.split_indices("train"), 1, 256, seed=0, buffer_bins=20_000)
        assert sum(1 for _ in s.batches(0)) == st.genome.total_bins // 256
    assert 19_000 <= held[0] <= 20_000 + 1024
    assert 19_000 <= held[1] <= 20_000 + 1024
