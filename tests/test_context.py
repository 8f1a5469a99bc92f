"""Local genomic context: window means of the supports, read alike by training and
imputation, and the model's use of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainstore import make_store

from edice_dist.context import check, read_window, window_means
from edice_dist.model import EDICE, ModelConfig
from edice_dist.predict import predict_chunk
from edice_dist.sampler import TrainSampler, read_validation, validation_plan


def naive_means(col: np.ndarray, h: int) -> np.ndarray:
    """Mean over [k - h, k + h] cut at both ends of ``col``, one bin at a time."""
    n = len(col)
    return np.array([col[max(0, k - h):min(n, k + h + 1)].mean() for k in range(n)])


def test_window_means_match_a_loop_and_cut_at_the_ends():
    rng = np.random.default_rng(0)
    chrom = rng.gamma(0.5, 2.0, size=(300, 3)).astype(np.float32)
    ctx = (2, 7, 40)
    full = window_means(chrom, ctx, 0, 0)
    assert full.shape == (300, 3, 4) and full.dtype == np.float32
    np.testing.assert_array_equal(full[:, :, 0], chrom)
    for i, h in enumerate(ctx, start=1):
        for t in range(3):
            np.testing.assert_allclose(full[:, t, i], naive_means(chrom[:, t], h), rtol=1e-5)
    # A window read with halos gives the same features as the whole chromosome.
    for start, stop in ((0, 50), (37, 130), (260, 300), (100, 101)):
        lo, hi = max(0, start - 40), min(300, stop + 40)
        part = window_means(chrom[lo:hi], ctx, start - lo, hi - stop)
        np.testing.assert_allclose(part, full[start:stop], rtol=1e-5)
    assert check([20, 4, 4]) == (4, 20)
    with pytest.raises(ValueError):
        check([0, 3])


@pytest.fixture(scope="module")
def ctx_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ctx") / "store")
    st, truth = make_store(path, n_cells=4, n_assays=3, chrom_bins=(3000, 700),
                           chunk_bins=1024, splits={(1, 1): "val"})
    return st, truth


def test_store_windows_are_the_same_whatever_the_read(ctx_store):
    """A bin's features do not depend on which block or chunk it was read with."""
    st, truth = ctx_store
    cols = np.array([0, 2, 5])
    ctx = (3, 50)
    whole = window_means(truth["chr1"][:, cols], ctx, 0, 0)
    for start, stop in ((0, 1024), (1000, 2048), (2990, 3000), (512, 1536)):
        got = read_window(st, "chr1", start, stop, cols, ctx)
        np.testing.assert_allclose(got, whole[start:stop], rtol=1e-5)


def test_sampler_and_validation_carry_the_context(ctx_store):
    st, truth = ctx_store
    cols = st.split_indices("train")
    ctx = (4, 20)
    table = {c: window_means(truth[c][:, cols], ctx, 0, 0) for c in st.genome.chroms}
    stacked = np.concatenate([table[c] for c in st.genome.chroms])
    s = TrainSampler(st, cols, 2, 32, seed=1, bins_per_epoch=640, block_bins=256, context=ctx)
    for b in s.batches(0):
        x = b.x.numpy()
        assert x.shape == (32, len(cols), 3)
        # Each row is some bin's features: find it by its values and compare all channels.
        for row in x[:4]:
            k = np.flatnonzero(np.all(np.isclose(stacked[:, :, 0], row[:, 0]), axis=1))
            assert len(k) >= 1
            np.testing.assert_allclose(row, stacked[k[0]], rtol=1e-5)
        np.testing.assert_array_equal(b.y.numpy(), np.take_along_axis(x[:, :, 0], b.target.numpy(), 1))
    plan = validation_plan(st, 200, seed=0, block_bins=256)
    xv, yv = read_validation(st, plan, cols, st.split_indices("val"), context=ctx)
    assert xv.shape == (200, len(cols), 3) and yv.shape == (200, 1)


def test_peak_by_window_takes_each_target_s_own_window_mean(ctx_store):
    """``peak_by=window`` decides a target's peak from its own track's mean over the
    smallest window (numpy, from the store's values), not from the bin or another column;
    ``peak_by=both`` from the smaller of that mean and the bin's own value, ``either`` from
    the larger, ``neighbours`` from the larger of that mean and the larger adjacent bin of
    the target's own track."""
    from edice_dist.trainloop import peak_level, training_loss

    st, truth = ctx_store
    cols = st.split_indices("train")
    ctx = (4, 20)
    stacked = np.concatenate([truth[c][:, cols] for c in st.genome.chroms])
    means = np.concatenate([np.stack([naive_means(truth[c][:, j], 4) for j in cols], 1)
                            for c in st.genome.chroms])
    adjacent = []
    for c in st.genome.chroms:
        d = truth[c][:, cols]
        adjacent.append(np.maximum(np.vstack([d[1:2], d[:-1]]), np.vstack([d[1:], d[-2:-1]])))
    adjacent = np.concatenate(adjacent)
    s = TrainSampler(st, cols, 2, 32, seed=3, bins_per_epoch=320, block_bins=256, context=ctx,
                     neighbours=True)
    for b in s.batches(0):
        assert peak_level(b, "bin") is None
        level = peak_level(b, "window").numpy()
        both = peak_level(b, "both").numpy()
        either = peak_level(b, "either").numpy()
        near = peak_level(b, "neighbours").numpy()
        x, tgt = b.x.numpy(), b.target.numpy()
        for r in range(8):
            k = np.flatnonzero(np.all(np.isclose(stacked, x[r, :, 0]), axis=1))[0]
            np.testing.assert_allclose(level[r], means[k, tgt[r]], rtol=1e-5)
            # ``both``: a peak only where the bin's own value and its window's mean are.
            np.testing.assert_allclose(
                both[r], np.minimum(means[k, tgt[r]], stacked[k, tgt[r]]), rtol=1e-5)
            # ``either``: a peak where the bin's own value or its window's mean is.
            np.testing.assert_allclose(
                either[r], np.maximum(means[k, tgt[r]], stacked[k, tgt[r]]), rtol=1e-5)
            # ``neighbours``: where the window's mean or a bin next to it is.
            np.testing.assert_allclose(
                near[r], np.maximum(means[k, tgt[r]], adjacent[k, tgt[r]]), rtol=1e-5)
        # The loss counts as peaks the bins whose window mean reaches the threshold.
        pred, y = torch.zeros_like(b.y), b.y
        thr = np.arcsinh(2.0)
        lv = np.where(np.arange(level.size).reshape(level.shape) % 3 == 0, thr + 1.0, 0.0)
        err = y.numpy() ** 2
        got = training_loss(pred, y, 2.0, torch.from_numpy(lv.astype(np.float32)))
        np.testing.assert_allclose(float(got), err.mean() + 2.0 * err[lv >= thr].mean(),
                                   rtol=1e-5)


def test_model_with_context_embeds_every_channel():
    """Channel c of a (cell, assay) input feeds the embedder's column assay * C + c, and
    predict_chunk equals the model on the same features."""
    torch.manual_seed(0)
    cfg = ModelConfig(4, 3, embed_dim=16, n_heads=4, ffn_dim=8, decoder_hidden=32,
                      context=(2, 9))
    model = EDICE(cfg).eval()
    assert model.cell_embed.linear.weight.shape == (16, 3 * 3)
    assert model.assay_embed.linear.weight.shape == (16, 4 * 3)
    rng = np.random.default_rng(1)
    tc = torch.tensor([0, 0, 1, 2, 3, 3])
    ta = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.from_numpy(rng.gamma(1.0, 1.0, size=(5, 6, 3)).astype(np.float32))
    support = torch.ones(5, 6, dtype=torch.bool)
    support[0, 1] = False
    y_c, y_a, nc, na = model.node_inputs(x, support, tc, ta)
    assert y_c.shape == (5, 4, 9) and y_a.shape == (5, 3, 12)
    # Cell 0 at bin 0 has only track 0 (assay 0) as support: its 3 channels, then zeros.
    np.testing.assert_allclose(y_c[0, 0].numpy(), np.r_[x[0, 0].numpy(), np.zeros(6)])
    # Assay 2 has tracks 2 (cell 1) and 5 (cell 3), each divided by N_a = 2.
    want = np.zeros((4, 3))
    want[1], want[3] = x[1, 2].numpy() / 2, x[1, 5].numpy() / 2
    np.testing.assert_allclose(y_a[1, 2].numpy(), want.ravel(), rtol=1e-6)
    qc, qa = np.array([0, 1, 2, 3]), np.array([2, 0, 1, 1])
    with torch.no_grad():
        direct = model(x, support.new_ones(5, 6), tc, ta, torch.from_numpy(qc),
                       torch.from_numpy(qa)).numpy().T
    got = predict_chunk(model, x.numpy(), np.arange(6), tc.numpy(), ta.numpy(), qc, qa,
                        dtype="float32")
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="3 value"):
        model(x[:, :, 0], support, tc, ta, torch.from_numpy(qc), torch.from_numpy(qa))


def test_actor_windows_equal_one_pass_over_the_chunk(ctx_store, tmp_path, monkeypatch):
    """An imputation actor computes a chunk of many supports in windows of bins, their
    context channels from its halo (imputepool.window_bins): the result equals the model
    on the whole chunk's features as read_window gives them, at the chromosome's ends too."""
    from edice_dist import imputepool
    from edice_dist.checkpoint import save_model
    from edice_dist.genome import Chunk
    from edice_dist.predict import prepare

    st, _ = ctx_store
    torch.manual_seed(0)
    cfg = ModelConfig(4, 3, embed_dim=16, n_heads=4, ffn_dim=8, decoder_hidden=32,
                      context=(3, 50), same_assay="attention")
    model = EDICE(cfg).eval()
    with torch.no_grad():
        model.same_assay_skip.weight.normal_(0, 0.1)  # a non-zero skip term
    save_model(str(tmp_path / "model"), model,
               {"cell_keys": [f"C{i:02d}" for i in range(4)], "assays": ["A0", "A1", "A2"],
                "transform": "arcsinh"})
    cols = st.split_indices("train")
    cells = np.array([int(t.cell_type[1:]) for t in st.tracks])
    assays = np.array([int(t.assay[1:]) for t in st.tracks])
    kc, ka = np.array([1, 0, 3]), np.array([1, 2, 0])
    spec = imputepool.WorkerSpec(
        str(tmp_path / "model"), st.path, "", str(tmp_path), cols, cells[cols], assays[cols],
        kc, ka, {}, device="cpu", dtype="float32", threads=1)
    monkeypatch.setattr(imputepool, "window_bins", lambda s, c: 300)
    monkeypatch.setattr(imputepool.ChunkWorker, "_start", lambda self, spec: None)
    worker = imputepool.ChunkWorker(spec)
    worker.pred, worker.store = prepare(model, "cpu", "float32"), st
    for chunk in (Chunk("chr1", 1, 1024, 2048), Chunk("chr1", 2, 2048, 3000),
                  Chunk("chr2", 0, 0, 700)):
        got, spread = worker._predict(worker._read(chunk), 0)
        x = read_window(st, chunk.chrom, chunk.start, chunk.stop, cols, cfg.context)
        want = predict_chunk(model, x, np.arange(len(cols)), cells[cols], assays[cols], kc, ka,
                             dtype="float32")
        assert spread is None and got.shape == want.shape == (3, chunk.stop - chunk.start)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
