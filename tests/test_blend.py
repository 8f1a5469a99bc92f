"""The AVG blend (``avg_blend``): its least-squares fit, how imputation mixes it in (and
training never does), and that a trained model carries the weight fitted on its
validation tracks, a refit its selection's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from trainstore import SMALL, make_store

from edice_dist import blend, checkpoint, predict
from edice_dist.checkpoint import load_meta, load_model
from edice_dist.model import EDICE, ModelConfig, extend_vocab
from edice_dist.sampler import read_validation, validation_plan
from edice_dist.store import open_store
from edice_dist.train import SELECT_DIR, train
from edice_dist.trainconfig import load_config

TINY = {"embed_dim": "16", "n_heads": "2", "ffn_dim": "16", "decoder_hidden": "64",
        "batch_size": "64", "val_bins": "1000", "workers": "1", "cpus_per_worker": "1",
        "seed": "3", "bins_per_epoch": "1024", "epochs": "2", "patience": "5",
        # float32 as the checks below compute: a CPU with native bf16 (AVX512-BF16, AMX)
        # would otherwise validate in bf16 and the stored sums differ by ~0.3 %.
        "precision": "float32"}


def _lstsq_weight(p, y, m) -> float:
    """argmin_l ||(1 - l) p + l m - y||^2 by numpy's least squares, clipped to [0, 1]."""
    r = (m - p).reshape(-1, 1)
    lam = np.linalg.lstsq(r, (y - p).reshape(-1), rcond=None)[0][0]
    return float(np.clip(lam, 0, 1))


def test_fit_is_the_least_squares_weight_of_all_validation_tracks_together():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.normal(size=(n, 4))
    m = y + rng.normal(scale=[0.5, 0.7, 1.0, 3.0], size=(n, 4))  # AVG: better and worse
    p = y + rng.normal(scale=[1.0, 0.9, 0.4, 0.3], size=(n, 4))
    sums = blend.validation_sums(*(torch.from_numpy(a) for a in (p, y, m)),
                                 torch.ones(4, dtype=torch.bool)).numpy()
    got = blend.fit(sums, 3)
    pooled = _lstsq_weight(p, y, m)
    assert 0.05 < pooled < 0.95  # not clipped: a real check
    assert got == pytest.approx((pooled,) * 3, rel=1e-9)
    # Per track it is not the pooled weight: the pooling is what is tested.
    assert abs(_lstsq_weight(p[:, 0], y[:, 0], m[:, 0]) - pooled) > 0.05
    # AVG erring the other way from the model: the weight clips to 0.
    away = p - 2 * (y - p)
    sums = blend.validation_sums(*(torch.from_numpy(a) for a in (p, y, away)),
                                 torch.ones(4, dtype=torch.bool)).numpy()
    assert blend.fit(sums, 2) == (0.0, 0.0)
    # A track whose assay no other cell has adds nothing.
    masked = blend.validation_sums(*(torch.from_numpy(a) for a in (p, y, m)),
                                   torch.tensor([True, True, False, True])).numpy()
    assert np.all(masked[2] == 0)
    assert blend.fit(masked, 1)[0] == pytest.approx(_lstsq_weight(p[:, [0, 1, 3]], y[:, [0, 1, 3]],
                                                                  m[:, [0, 1, 3]]), rel=1e-9)
    assert blend.fit(np.zeros((0, 2)), 3) == (0.0, 0.0, 0.0)


def _batch(rng, n_cells=4, n_assays=3, B=6):
    """Columns for every (cell, assay) but one, a replicate of (0, 0), random supports."""
    pairs = [(c, a) for c in range(n_cells) for a in range(n_assays) if (c, a) != (3, 2)]
    pairs.append((0, 0))
    tc = np.array([c for c, _ in pairs])
    ta = np.array([a for _, a in pairs])
    x = rng.gamma(1.0, 1.0, size=(B, len(pairs))).astype(np.float32)
    sup = rng.random((B, len(pairs))) < 0.7
    sup[0, ta == 2] = False  # bin 0: nobody has assay 2, so no AVG there
    sup[1, (ta == 1) & (tc != 1)] = False  # bin 1: only cell 1 has assay 1
    return x, sup, tc, ta


def _avg_numpy(x, sup, tc, ta, cell, assay):
    """(B,) the mean of ``assay`` over the supports of other cells; NaN where none."""
    keep = sup & (ta == assay)[None] & (tc != cell)[None]
    n = keep.sum(1)
    return np.where(n > 0, (x * keep).sum(1) / np.maximum(n, 1), np.nan)


@pytest.mark.parametrize("same_assay", ["attention", "none"])
def test_imputation_mixes_avg_per_assay_and_training_never_does(same_assay):
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    cfg = ModelConfig(n_cells=4, n_assays=3, embed_dim=8, n_heads=2, ffn_dim=8,
                      decoder_hidden=16, decoder_dropout=0.0, attn_dropout=0.0,
                      same_assay=same_assay)
    net = EDICE(cfg).eval()
    x, sup, tc, ta = _batch(rng)
    t_cells = np.repeat(np.arange(4), 3)
    t_assays = np.tile(np.arange(3), 4)
    args = [torch.from_numpy(v) for v in (x, sup, tc, ta, t_cells, t_assays)]
    with torch.no_grad():
        p0 = net(*args).numpy().astype(np.float64)
        weights = (0.3, 0.0, 1.0)
        net.set_blend(weights)
        p1 = net(*args).numpy()
        # Per-bin targets (training's layout) mix the same way.
        per_bin = net(*args[:4], args[4].expand(6, -1), args[5].expand(6, -1)).numpy()
    expect = p0.copy()
    for k, (c, a) in enumerate(zip(t_cells, t_assays, strict=True)):
        m = _avg_numpy(x, sup, tc, ta, c, a)
        expect[:, k] = np.where(np.isnan(m), p0[:, k], p0[:, k] + weights[a] * (m - p0[:, k]))
    np.testing.assert_allclose(p1, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_bin, expect, rtol=1e-5, atol=1e-5)
    assert not np.allclose(p1, p0, atol=1e-3)
    assert np.allclose(p1[0, t_assays == 2], p0[0, t_assays == 2], atol=1e-6)  # no AVG
    # Imputation's fast path gives the same (one support set for every bin: all True).
    full = np.ones_like(sup)
    with torch.no_grad():
        direct = net(torch.from_numpy(x), torch.from_numpy(full), *args[2:]).numpy()
    fast = predict.predict_chunk(net, x, np.arange(x.shape[1]), tc, ta, t_cells, t_assays,
                                 dtype="float32")  # CPUs with native bf16 default to it
    np.testing.assert_allclose(fast.T, direct, rtol=1e-5, atol=1e-5)
    # Training never mixes: the weights learn the same with and without a blend.
    net.train()
    with torch.no_grad():
        trained = net(*args).numpy()
    np.testing.assert_allclose(trained, p0, rtol=1e-6, atol=1e-6)


def test_the_spread_shrinks_with_the_decoders_share_of_the_output():
    rng = np.random.default_rng(2)
    torch.manual_seed(0)
    cfg = ModelConfig(n_cells=4, n_assays=3, embed_dim=8, n_heads=2, ffn_dim=8,
                      decoder_hidden=16, same_assay="attention")
    net = EDICE(cfg).eval()
    x, _, tc, ta = _batch(rng)
    t_cells, t_assays = np.array([3, 1, 2]), np.array([2, 1, 0])
    cols = np.arange(x.shape[1])
    _, sd0 = predict.predict_chunk(net, x, cols, tc, ta, t_cells, t_assays, samples=8, seed=4,
                                   dtype="float32")
    net.set_blend((0.25, 0.5, 0.0))
    _, sd1 = predict.predict_chunk(net, x, cols, tc, ta, t_cells, t_assays, samples=8, seed=4,
                                   dtype="float32")
    scale = 1 - np.array([0.0, 0.5, 0.25])[:, None]  # each target's assay weight
    np.testing.assert_allclose(sd1, sd0 * scale, rtol=1e-5, atol=1e-6)


def test_blend_is_checked_and_kept_when_the_vocabulary_grows():
    with pytest.raises(ValueError, match="one weight in"):
        ModelConfig(n_cells=2, n_assays=3, blend=(0.1, 0.2))
    with pytest.raises(ValueError, match="one weight in"):
        ModelConfig(n_cells=2, n_assays=2, blend=(0.1, 1.5))
    net = EDICE(ModelConfig(n_cells=2, n_assays=2, embed_dim=8, n_heads=2, ffn_dim=8,
                            decoder_hidden=16, blend=(0.4, 0.2)))
    grown = extend_vocab(net, 3, 3)
    assert grown.cfg.blend == (0.4, 0.2, 0.0)
    assert grown.blend.tolist() == pytest.approx([0.4, 0.2, 0.0])
    net.set_blend((0.0, 0.0))
    assert net.cfg.blend == () and net.blend.numel() == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("blend") / "store")
    make_store(path, **SMALL)
    return path


def test_the_model_carries_the_least_squares_blend_of_its_validation_tracks(store, ray_local,
                                                                           tmp_path):
    """Against the selection model's own predictions on the validation bins, AVG in numpy
    and numpy's least squares; the refit takes the selection's weights unchanged."""
    out = str(tmp_path / "model")
    cfg = load_config(None, {**TINY, "refit": "true"})
    train(store, out, cfg)
    sel, meta = load_model(os.path.join(out, SELECT_DIR))
    refit, refit_meta = load_model(out)
    assert meta["avg_blend"] and refit_meta["avg_blend"] == meta["avg_blend"]
    assert refit.cfg.blend == sel.cfg.blend

    st = open_store(store)
    inputs = meta["data"]["inputs"]["columns"]
    val = meta["data"]["val"]["columns"]
    xv, yv = read_validation(st, validation_plan(st, cfg.val_bins, cfg.seed), inputs, val,
                             context=tuple(cfg.context))
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    tc = np.array([ci[st.tracks[i].cell_key] for i in inputs + val])
    ta = np.array([ai[st.tracks[i].assay] for i in inputs + val])
    n_in = len(inputs)
    sel.set_blend(())
    x = np.asarray(xv, dtype=np.float32)
    with torch.no_grad():
        p = sel(torch.from_numpy(x), torch.ones(x.shape[:2], dtype=torch.bool),
                torch.from_numpy(tc[:n_in]), torch.from_numpy(ta[:n_in]),
                torch.from_numpy(tc[n_in:]), torch.from_numpy(ta[n_in:])).double().numpy()
    values = x[..., 0].astype(np.float64)
    m = np.stack([_avg_numpy(values, np.ones_like(values, bool), tc[:n_in], ta[:n_in],
                             tc[n_in + k], ta[n_in + k]) for k in range(len(val))], axis=1)
    y = yv.astype(np.float64)
    weights = list(meta["avg_blend"].values())
    assert len(set(weights)) == 1
    assert weights[0] == pytest.approx(_lstsq_weight(p, y, m), rel=1e-3, abs=1e-4)
    # This tiny model loses to AVG on these tracks and its weight clips to 1: the sums
    # the fit was made from are checked as well, so a weight of 1 alone passes nothing.
    epoch = [c for c in checkpoint.epoch_checkpoints(os.path.join(out, SELECT_DIR))
             if c["epoch"] == meta["epoch"]][-1]
    sums = np.asarray(checkpoint.load_state(epoch["path"])["blend_sums"])
    expect = np.stack([((m - p) * (y - p)).sum(0), ((m - p) ** 2).sum(0)], axis=1)
    np.testing.assert_allclose(sums, expect, rtol=1e-3)


def test_avg_blend_false_keeps_the_models_own_output(store, ray_local, tmp_path):
    out = str(tmp_path / "model")
    train(store, out, load_config(None, {**TINY, "refit": "false", "epochs": "1",
                                         "avg_blend": "false"}))
    meta = load_meta(out)
    assert "avg_blend" not in meta and not meta["model_config"]["blend"]
