"""Per-bin spreads of the imputation (Monte Carlo dropout): what they are, and that a run
writes them as bigWigs beside the imputed tracks without changing those."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pyBigWig
import pytest
import torch
import zarr
from test_impute import GENOME, direct_forward, make_model, make_store

from edice_dist import predict as P
from edice_dist.errors import InputError
from edice_dist.impute import impute
from edice_dist.model import EDICE, ModelConfig
from edice_dist.runfolder import describe as describe_run


def _model(dropout=0.3, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_cells=6, n_assays=4, embed_dim=16, decoder_hidden=32,
                      decoder_dropout=dropout)
    return EDICE(cfg).eval()


def _data(n_bins=300, seed=1):
    rng = np.random.default_rng(seed)
    x = np.arcsinh(rng.gamma(0.8, 2.0, (n_bins, 12))).astype(np.float32)
    pairs = rng.choice(24, size=12, replace=False)
    return x, pairs // 4, pairs % 4


def _by_hand(model, x, tc, ta, kc, ka, samples):
    """Monte Carlo dropout with the model's own training-time decoder: the attention in
    eval mode, then ``samples`` passes of ``decode_hidden`` in training mode (its own
    masks); the numpy standard deviation (ddof 1) of those passes, (K, n_bins)."""
    xs = torch.from_numpy(x)
    sup = torch.ones(xs.shape, dtype=torch.bool)
    with torch.no_grad():
        c_ctx, a_ctx = model.contextualise(xs, sup, torch.as_tensor(tc), torch.as_tensor(ta),
                                           torch.as_tensor(kc), torch.as_tensor(ka))
        pc, pa = model.first_layer_halves(c_ctx, a_ctx)
        z = pc + pa  # targets are (kc[i], ka[i]) = query positions i, i
        model.train()
        try:
            draws = np.stack([model.decode_hidden(z).numpy() for _ in range(samples)])
        finally:
            model.eval()
    return draws.std(axis=0, ddof=1).T


def test_spread_is_the_spread_of_dropout_samples():
    model = _model()
    x, tc, ta = _data()
    cols = np.arange(12)
    kc, ka = np.array([0, 1, 2, 3]), np.array([3, 2, 1, 0])  # distinct: one query each
    plain = P.predict_chunk(model, x, cols, tc, ta, kc, ka, dtype="float32")
    state = torch.get_rng_state()
    y, sd = P.predict_chunk(model, x, cols, tc, ta, kc, ka, dtype="float32", samples=64,
                            seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is kept
    np.testing.assert_array_equal(y, plain)  # spreads never change the imputed values
    assert sd.shape == plain.shape and sd.dtype == np.float32
    assert np.isfinite(sd).all() and (sd >= 0).all() and sd.mean() > 0.01

    torch.manual_seed(123)
    ref = _by_hand(model, x, tc, ta, kc, ka, samples=64)
    # Two independent estimates of the same per-bin standard deviation, 64 draws each.
    assert abs(sd.mean() / ref.mean() - 1) < 0.05
    assert np.corrcoef(sd.ravel(), ref.ravel())[0, 1] > 0.8

    _, again = P.predict_chunk(model, x, cols, tc, ta, kc, ka, dtype="float32", samples=64,
                               seed=7)
    np.testing.assert_array_equal(again, sd)  # seeded: a chunk's spread is reproducible
    _, other = P.predict_chunk(model, x, cols, tc, ta, kc, ka, dtype="float32", samples=64,
                               seed=8)
    assert not np.array_equal(other, sd)


def test_spread_bf16_close_to_float32():
    model = _model(seed=2)
    x, tc, ta = _data(seed=3)
    kc, ka = np.array([0, 5, 5]), np.array([1, 1, 2])
    _, a = P.predict_chunk(model, x, np.arange(12), tc, ta, kc, ka, dtype="float32",
                           samples=200, seed=1)
    _, b = P.predict_chunk(model, x, np.arange(12), tc, ta, kc, ka, dtype="bfloat16",
                           samples=200, seed=1)
    assert abs(b.mean() / a.mean() - 1) < 0.05


def test_spread_needs_dropout_and_two_samples():
    x, tc, ta = _data()
    with pytest.raises(ValueError, match="no decoder dropout"):
        P.predict_chunk(_model(dropout=0.0), x, np.arange(12), tc, ta, [0], [0], samples=4)
    for bad in (1, -2):
        with pytest.raises(ValueError, match="at least 2"):
            P.predict_chunk(_model(), x, np.arange(12), tc, ta, [0], [0], samples=bad)


def test_impute_writes_spread_bigwigs(ray_local, tmp_path):
    store = make_store(tmp_path / "store")
    model = make_model(tmp_path / "model")
    run = str(tmp_path / "run")
    summary = impute(store, model, run, workers=1, dtype="float32", uncertainty=4,
                     space="arcsinh")
    info = json.loads(open(os.path.join(run, "run.json")).read())
    assert info["uncertainty"] == 4
    targets = [(t["cell_key"], t["assay"]) for t in info["targets"]]
    assert summary["export"]["files"] == 2 * len(targets)
    root = zarr.open_group(os.path.join(run, "imputed.zarr"), mode="r")
    rows = open(os.path.join(run, "bigwig", "manifest.tsv")).read().splitlines()
    assert rows[0].split("\t")[-1] == "spread_path"
    # The chunk seed of the actors: the spread of chunk 0 of chr1 recomputed directly.
    from edice_dist.checkpoint import load_model
    from edice_dist.store import open_store

    m, meta = load_model(model)
    st = open_store(store)
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    cols = [i for i, t in enumerate(st.tracks)
            if t.split in ("train", "val") and t.cell_type in ci]
    x = st.read("chr1", 0, 64, columns=np.array(cols))
    _, sd0 = P.predict_chunk(m, x, np.arange(len(cols)),
                             [ci[st.tracks[i].cell_type] for i in cols],
                             [ai[st.tracks[i].assay] for i in cols],
                             [ci[c] for c, _ in targets], [ai[a] for _, a in targets],
                             dtype="float32", samples=4, seed=zlib.crc32(b"chr1:0"))
    for chrom in GENOME.chroms:
        want = direct_forward(model, store, targets, chrom)
        spread = np.asarray(root[f"{chrom}_spread"][:])
        assert np.isfinite(spread).all() and (spread >= 0).all() and spread.mean() > 0
        if chrom == "chr1":
            np.testing.assert_allclose(spread[:, :64], sd0, rtol=1e-6)
        for k, (cell, assay) in enumerate(targets):
            bw = pyBigWig.open(os.path.join(run, "bigwig", f"{cell}-{assay}.bigWig"))
            np.testing.assert_allclose(np.array(bw.intervals(chrom))[:, 2], want[k],
                                       rtol=2e-5, atol=1e-6)
            bw.close()
            bw = pyBigWig.open(os.path.join(run, "bigwig", f"{cell}-{assay}.spread.bigWig"))
            got = np.array(bw.intervals(chrom))[:, 2]
            bw.close()
            np.testing.assert_allclose(got, spread[k], rtol=1e-6)  # arcsinh units as stored
    trackdb = open(os.path.join(run, "bigwig", "trackDb.txt")).read()
    assert all(f"{c}-{a}.spread.bigWig" in trackdb for c, a in targets)
    assert f"{2 * len(targets)}/{2 * len(targets)} written" in describe_run(run)
    # Spreads are part of what a run is: leaving them out is another run.
    with pytest.raises(InputError, match="uncertainty"):
        impute(store, model, run, workers=1, dtype="float32", space="arcsinh")


def test_impute_refuses_spreads_it_cannot_make(ray_local, tmp_path):
    store = make_store(tmp_path / "store")
    model = make_model(tmp_path / "model")
    with pytest.raises(InputError, match="at least 2"):
        impute(store, model, str(tmp_path / "a"), uncertainty=1)
    torch.manual_seed(0)
    m = EDICE(ModelConfig(n_cells=4, n_assays=3, embed_dim=16, decoder_hidden=32,
                          decoder_dropout=0.0))
    from edice_dist.checkpoint import save_model

    save_model(str(tmp_path / "nodrop"), m, {"cell_keys": ["A", "B", "C", "D"],
                                             "assays": ["DNase", "H3K27ac", "H3K4me3"],
                                             "transform": "arcsinh"})
    with pytest.raises(InputError, match="decoder_dropout 0"):
        impute(store, str(tmp_path / "nodrop"), str(tmp_path / "b"), uncertainty=4)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
