"""The fast inference path against the model's own forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edice_dist import predict as P
from edice_dist.model import EDICE, ModelConfig, decoder_macs


def _model(n_cells=7, n_assays=5, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_cells=n_cells, n_assays=n_assays, embed_dim=16, decoder_hidden=32, **kw)
    return EDICE(cfg).eval()


def _data(T=14, n_bins=200, n_cells=7, n_assays=5, seed=1):
    rng = np.random.default_rng(seed)
    x = np.arcsinh(rng.gamma(0.8, 2.0, (n_bins, T))).astype(np.float32)
    pairs = rng.choice(n_cells * n_assays, size=T, replace=False)
    return x, pairs // n_assays, pairs % n_assays


def _forward(model, x, cols, tc, ta, kc, ka, device="cpu"):
    """The model's direct forward pass: (K, n_bins)."""
    with torch.no_grad():
        xs = torch.as_tensor(x[:, cols], device=device)
        sup = torch.ones(xs.shape, dtype=torch.bool, device=device)
        out = model.to(device)(xs, sup, torch.as_tensor(tc[cols], device=device),
                               torch.as_tensor(ta[cols], device=device),
                               torch.as_tensor(kc, device=device), torch.as_tensor(ka, device=device))
    return out.float().cpu().numpy().T


@pytest.mark.parametrize("same_assay", ["none", "mean", "attention"])
def test_equals_forward_float32(device, monkeypatch, same_assay):
    model = _model(same_assay=same_assay)
    if model.same_assay_skip is not None:  # a read-out that matters
        torch.nn.init.normal_(model.same_assay_skip.weight, std=0.1)
    x, tc, ta = _data()
    cols = np.array([0, 2, 3, 5, 8, 9, 11, 13])
    # Repeated cells and assays, a repeated target, and targets that are supports.
    kc = np.array([0, 0, 3, 6, 6, 1, 0, tc[0]])
    ka = np.array([4, 1, 1, 0, 0, 2, 4, ta[0]])
    ref = _forward(model, x, cols, tc, ta, kc, ka, device)
    # Tiny row budgets so that both bin batches and target blocks are split unevenly.
    monkeypatch.setattr(P, "ROWS_CPU", 12)
    monkeypatch.setattr(P, "ROWS_CUDA", 12)
    got = P.predict_chunk(model, x, cols, tc, ta, kc, ka, batch_bins=7, device=device,
                          dtype="float32")
    assert got.shape == (len(kc), x.shape[0]) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # The default batch size gives the same values.
    got2 = P.predict_chunk(P.prepare(model, device, "float32"), x, cols, tc, ta, kc, ka)
    np.testing.assert_allclose(got2, ref, rtol=1e-5, atol=1e-6)


def test_batches_shrink_to_the_encoder_budget_and_predict_the_same(monkeypatch):
    """With many cells the encoder's activations set the batch size, not the decoder's
    rows; the predictions do not depend on it."""
    model = _model(n_cells=7, n_assays=5, same_assay="attention")
    torch.nn.init.normal_(model.same_assay_skip.weight, std=0.1)
    x, tc, ta = _data(n_bins=300)
    cols = np.arange(14)
    kc, ka = np.array([0, 1, 2, 3, 4, 5, 6]), np.array([0, 1, 2, 3, 4, 0, 1])
    ref = _forward(model, x, cols, tc, ta, kc, ka)
    per_bin = P.encode_bytes_per_bin(model.cfg, 14, 7, 5)
    # The attention's logits (heads x queries x cells) and the skip's all-pairs sums are
    # counted: the estimate is at least their float32 bytes.
    cfg = model.cfg
    assert per_bin >= 4 * cfg.n_heads * (7 * 7 + 5 * 5 + 7 * 5 * (cfg.n_channels + 1))
    monkeypatch.setattr(P, "ROWS_CPU", 7 * 16)  # the decoder alone: 128-bin batches
    sizes = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda xb, *a: sizes.append(len(xb)) or encode(xb, *a))
    for budget, want in ((per_bin * 1000, P.MIN_BATCH_BINS), (per_bin * 40, 32),
                         (per_bin * 70, 64), (per_bin, P.SMALLEST_BATCH_BINS)):
        monkeypatch.setattr(P, "ENCODE_BYTES", budget)
        assert P.encode_batch_bins(cfg, 14, 7, 5) == want
        sizes.clear()
        got = P.predict_chunk(P.prepare(model, "cpu", "float32"), x, cols, tc, ta, kc, ka)
        assert max(sizes) == want and sum(sizes) == len(x)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # Few targets: the decoder's rows ask for 1,170-bin batches, the budget caps them.
    monkeypatch.setattr(P, "ROWS_CPU", 8192)
    monkeypatch.setattr(P, "ENCODE_BYTES", per_bin * 300)
    assert P.encode_batch_bins(cfg, 14, 7, 5, most=8192 // 7) == 256
    # A GPU's budget is its own.
    monkeypatch.setattr(P, "ENCODE_BYTES_CUDA", per_bin * 600)
    assert P.encode_batch_bins(cfg, 14, 7, 5, most=8192 // 7, device="cuda") == 512
    # A larger vocabulary never gets larger batches.
    big = ModelConfig(n_cells=125, n_assays=24, embed_dim=16, decoder_hidden=32,
                      same_assay="attention")
    assert P.encode_bytes_per_bin(big, 1000, 125, 24) > per_bin


def test_bf16_close_to_float32(device):
    model = _model(seed=3)
    x, tc, ta = _data(seed=4)
    cols = np.arange(10)
    kc, ka = np.array([0, 1, 2, 3, 4, 5, 6]), np.array([0, 1, 2, 3, 4, 0, 1])
    ref = _forward(model, x, cols, tc, ta, kc, ka, device)
    got = P.predict_chunk(model, x, cols, tc, ta, kc, ka, device=device, dtype="bfloat16")
    # bf16 keeps 8 significant bits: errors of a few 1e-3 of the output's scale.
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 2e-2 * scale
    assert np.abs(got - ref).max() > 0  # it did run in bf16


def test_non_finite_inputs_count_as_zero():
    model = _model()
    x, tc, ta = _data(n_bins=40)
    cols = np.arange(8)
    kc, ka = np.array([1, 2]), np.array([3, 4])
    bad = x.copy()
    bad[3, 2], bad[10, 5], bad[11, 0] = np.nan, np.inf, -np.inf
    zero = x.copy()
    zero[3, 2] = zero[10, 5] = zero[11, 0] = 0.0
    got = P.predict_chunk(model, bad, cols, tc, ta, kc, ka, dtype="float32", device="cpu")
    np.testing.assert_allclose(got, _forward(model, zero, cols, tc, ta, kc, ka), rtol=1e-5, atol=1e-6)


def test_rejects_bad_arguments():
    model = _model()
    x, tc, ta = _data(n_bins=10)
    kc, ka = np.array([1]), np.array([1])
    with pytest.raises(ValueError, match="support_cols is empty"):
        P.predict_chunk(model, x, [], tc, ta, kc, ka, device="cpu")
    with pytest.raises(ValueError, match="target_cells"):
        P.predict_chunk(model, x, [0], tc, ta, np.array([7]), ka, device="cpu")
    with pytest.raises(ValueError, match="column"):
        P.predict_chunk(model, x, [99], tc, ta, kc, ka, device="cpu")
    with pytest.raises(ValueError, match="equal length"):
        P.predict_chunk(model, x, [0], tc, ta, np.array([1, 2]), ka, device="cpu")
    with pytest.raises(ValueError, match=r"\(n_bins, T\)"):
        P.predict_chunk(model, x[0], [0], tc, ta, kc, ka, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        P.resolve_dtype(torch.device("cpu"), "float16")


def test_resolve_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert P.resolve_dtype(cpu, "float32") is torch.float32
    assert P.resolve_dtype(cpu, "bf16") is torch.bfloat16
    assert P.resolve_dtype(torch.device("cuda"), None) is torch.bfloat16
    monkeypatch.setenv("EDICE_PREDICT_DTYPE", "float32")
    assert P.resolve_dtype(torch.device("cuda"), None) is torch.float32
    monkeypatch.delenv("EDICE_PREDICT_DTYPE")
    expect = torch.bfloat16 if P.cpu_has_fast_bf16() else torch.float32
    assert P.resolve_dtype(cpu, None) is expect


def test_flops_per_bin_counts_the_decoder_per_target():
    model = _model()
    one = P.flops_per_bin(model, 1, 1, 1)
    three = P.flops_per_bin(model, 3, 1, 1)
    h = model.cfg.decoder_hidden
    assert three - one == 2 * 2 * decoder_macs(model.cfg)
    assert decoder_macs(model.cfg) == h * h + h  # one hidden-to-hidden layer and the output
    # One more queried cell adds its first-layer half and its attention query.
    assert P.flops_per_bin(model, 1, 2, 1) - one > 2 * model.cfg.embed_dim * h


@pytest.mark.slow
def test_compiled_decoder_equals_forward(monkeypatch):
    """The torch.compile path (default for paper-size models on bf16 CPUs), with the
    padding of the last bin batch and target block that keeps its shapes static."""
    model = _model(seed=7)
    x, tc, ta = _data(n_bins=45, seed=8)
    cols = np.arange(9)
    kc, ka = np.array([0, 1, 2, 3, 4, 5, 6]), np.array([0, 1, 2, 3, 4, 0, 1])
    monkeypatch.setattr(P, "ROWS_CPU", 16)  # 4 target blocks of 2 (1 padded); 45 = 5 x 8 + 5 bins
    pred = P.prepare(model, "cpu", "float32", compile=True)
    assert pred.compiled
    got = P.predict_chunk(pred, x, cols, tc, ta, kc, ka, batch_bins=8)
    assert pred.compiled  # did not fall back to eager
    np.testing.assert_allclose(got, _forward(model, x, cols, tc, ta, kc, ka), rtol=1e-5, atol=1e-6)
