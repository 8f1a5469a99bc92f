"""The eDICE model against SPEC section 2, checked with an independent numpy version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edice_dist.model import (
    EDICE,
    INDIVIDUAL_LOGIT_SCALE,
    ModelConfig,
    extend_vocab,
    keep_mask,
)
from edice_dist.sameassay import HEAD_DIM, LOGIT_CAP, SKIP_SCALE


def small_model(n_cells=5, n_assays=4, seed=0, **kw) -> EDICE:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_cells, n_assays, embed_dim=16, n_heads=4, ffn_dim=8,
                      decoder_hidden=32, **kw)
    model = EDICE(cfg).eval()
    # Non-zero biases and embeddings everywhere, so that every term of SPEC 2 matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_batch(n_cells=5, n_assays=4, n_bins=6, seed=1, p_obs=0.6, p_sup=0.7):
    """Observed tracks (a random subset of the grid), values and a random support mask."""
    rng = np.random.default_rng(seed)
    pairs = [(c, a) for c in range(n_cells) for a in range(n_assays) if rng.random() < p_obs]
    tc = torch.tensor([c for c, _ in pairs])
    ta = torch.tensor([a for _, a in pairs])
    x = torch.from_numpy(rng.gamma(1.0, 1.0, size=(n_bins, len(pairs))).astype(np.float32))
    support = torch.from_numpy(rng.random((n_bins, len(pairs))) < p_sup)
    return x, support, tc, ta


# -- an independent implementation of SPEC section 2, one bin at a time, in float64 -----------

def _np_params(model):
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def _np_block(h, has_key, P, pre, n_heads, bias=None):
    """Multi-head self-attention over all nodes (keys masked, ``bias`` (heads, N, N) added
    to the scores), residual, FFN, residual."""
    N, d = h.shape
    hd = d // n_heads
    w, b = P[f"{pre}.in_proj.weight"], P[f"{pre}.in_proj.bias"]
    q, k, v = (h @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
    out = np.zeros((N, d))
    if has_key.any():
        for head in range(n_heads):
            s = slice(head * hd, (head + 1) * hd)
            scores = q[:, s] @ k[:, s].T / np.sqrt(hd)
            if bias is not None:
                scores = scores + bias[head]
            scores[:, ~has_key] = -np.inf
            a = np.exp(scores - scores.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)
            out[:, s] = a @ v[:, s]
        out = out @ P[f"{pre}.out_proj.weight"].T + P[f"{pre}.out_proj.bias"]
    x = h + out
    f = np.maximum(x @ P[f"{pre}.ffn.0.weight"].T + P[f"{pre}.ffn.0.bias"], 0)
    return x + f @ P[f"{pre}.ffn.2.weight"].T + P[f"{pre}.ffn.2.bias"]


def _np_individual_bias(cfg, P):
    """SPEC 2.7's individual bias: the scaled logit of each head between two cells of one
    named individual, 0 elsewhere."""
    if "individual_logit" not in P:
        return None
    ind = np.array(cfg.cell_individuals, dtype=object)
    same = (ind[:, None] == ind[None, :]) & (ind != "")[:, None]
    return INDIVIDUAL_LOGIT_SCALE * P["individual_logit"][:, None, None] * same[None]


def _np_same_assay(cfg, P, yc_sum, sup, hc, cc_row, a):
    """The same-assay skip of one target at one bin: SKIP_SCALE * w[a] . the plain or
    attention-weighted mean of assay a over the cells that observe it (0 where none)."""
    if cfg.same_assay == "none" or not sup[:, a].any():
        return 0.0
    w = SKIP_SCALE * P["same_assay_skip.weight"][a, :, 0]
    vals = yc_sum[sup[:, a], a]
    if cfg.same_assay == "mean":
        return w[0] * vals.mean()
    q = cc_row @ P["same_assay_skip.query.weight"].T + P["same_assay_skip.query.bias"]
    k = hc @ P["same_assay_skip.key.weight"].T + P["same_assay_skip.key.bias"]
    total = 0.0
    for h in range(cfg.n_heads):
        s = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        logit = LOGIT_CAP * np.tanh(k[:, s] @ q[s] / np.sqrt(HEAD_DIM) / LOGIT_CAP)
        e = np.exp(logit[sup[:, a]] - logit[sup[:, a]].max())
        total += w[h] * (e @ vals) / e.sum()
    return total


def numpy_forward(model, x, support, tc, ta, qc, qa):
    """Predictions (B, K) for targets qc, qa of shape (K,) or (B, K)."""
    cfg = model.cfg
    P = _np_params(model)
    x, support = x.double().numpy(), support.numpy()
    tc, ta = tc.numpy(), ta.numpy()
    qc, qa = np.asarray(qc), np.asarray(qa)
    B = x.shape[0]
    K = qc.shape[-1]
    out = np.zeros((B, K))
    for b in range(B):
        yc = np.zeros((cfg.n_cells, cfg.n_assays))
        sup = np.zeros((cfg.n_cells, cfg.n_assays), dtype=bool)
        nc = np.zeros(cfg.n_cells)
        na = np.zeros(cfg.n_assays)
        for t in range(len(tc)):
            if support[b, t]:
                yc[tc[t], ta[t]] = x[b, t]
                sup[tc[t], ta[t]] = True
                nc[tc[t]] += 1
                na[ta[t]] += 1
        y_sum = yc.copy()
        ya = yc.T.copy()
        yc = yc / np.maximum(nc, 1)[:, None]
        ya = ya / np.maximum(na, 1)[:, None]
        hc = np.maximum(yc @ P["cell_embed.linear.weight"].T + P["cell_embed.linear.bias"], 0) \
            + P["cell_embed.table.weight"]
        ha = np.maximum(ya @ P["assay_embed.linear.weight"].T + P["assay_embed.linear.bias"], 0) \
            + P["assay_embed.table.weight"]
        cc = _np_block(hc, nc > 0, P, "cell_context", cfg.n_heads, _np_individual_bias(cfg, P))
        ac = _np_block(ha, na > 0, P, "assay_context", cfg.n_heads)
        rc = qc[b] if qc.ndim == 2 else qc
        ra = qa[b] if qa.ndim == 2 else qa
        for k in range(K):
            z = np.concatenate([cc[rc[k]], ac[ra[k]]])
            for i in range(cfg.decoder_layers):
                z = np.maximum(P[f"decoder.{i}.weight"] @ z + P[f"decoder.{i}.bias"], 0)
            out[b, k] = (P["output.weight"] @ z + P["output.bias"])[0] + _np_same_assay(
                cfg, P, y_sum, sup, hc, cc[rc[k]], ra[k])
    return out


# -- tests ---------------------------------------------------------------------------------

def test_paper_model_has_5985025_parameters():
    model = EDICE(ModelConfig(n_cells=127, n_assays=24))
    assert model.n_parameters() == 5_985_025
    # SPEC 2.4: about 88 % of them in the decoder.
    dec = sum(p.numel() for p in model.decoder.parameters()) + sum(
        p.numel() for p in model.output.parameters())
    assert 0.87 < dec / model.n_parameters() < 0.89
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.n_heads, cfg.ffn_dim, cfg.decoder_hidden, cfg.decoder_layers,
            cfg.decoder_dropout, cfg.attn_dropout) == (256, 4, 128, 2048, 2, 0.3, 0.1)


def test_forward_matches_numpy_reference():
    model = small_model()
    x, support, tc, ta = random_batch()
    qc = torch.tensor([0, 1, 4, 4, 2])
    qa = torch.tensor([3, 0, 1, 2, 2])
    with torch.no_grad():
        got = model(x, support, tc, ta, qc, qa).numpy()
    ref = numpy_forward(model, x, support, tc, ta, qc, qa)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


PEOPLE = ("ann", "ann", "bob", "bob", "")
"""Cells 0-1 of one individual, 2-3 of another, 4 of none."""


def test_individual_bias_matches_numpy_reference():
    model = small_model(individual_bias=True, cell_individuals=PEOPLE)
    with torch.no_grad():  # logits of 1.5, -0.9, 3 and 0 between cells of one individual
        model.individual_logit.copy_(torch.tensor([1.5, -0.9, 3.0, 0.0]) / INDIVIDUAL_LOGIT_SCALE)
    x, support, tc, ta = random_batch(n_bins=8, seed=5)
    support[:, tc == 0] = False  # cell 0 has no support: it reads its own individual's cells
    qc = torch.tensor([0, 1, 2, 4, 3])
    qa = torch.tensor([3, 0, 1, 2, 2])
    with torch.no_grad():
        got = model(x, support, tc, ta, qc, qa).numpy()
        plain = EDICE(ModelConfig(**{**model.cfg.__dict__, "individual_bias": False})).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items()
                               if k != "individual_logit"})
        without = plain(x, support, tc, ta, qc, qa).numpy()
    np.testing.assert_allclose(got, numpy_forward(model, x, support, tc, ta, qc, qa),
                               rtol=1e-4, atol=1e-5)
    assert np.abs(got - without).max() > 1e-3  # the bias is not a no-op


def test_individual_bias_without_individuals_adds_nothing():
    a = small_model(individual_bias=True, seed=3)
    b = small_model(individual_bias=False, seed=3)
    assert a.individual_logit is None and "individual_logit" not in a.state_dict()
    x, support, tc, ta = random_batch(seed=4)
    q = torch.tensor([0, 2, 4]), torch.tensor([1, 1, 3])
    with torch.no_grad():
        np.testing.assert_array_equal(a(x, support, tc, ta, *q).numpy(),
                                      b(x, support, tc, ta, *q).numpy())


def test_extend_vocab_names_the_new_cells_individuals():
    model = small_model(individual_bias=True, cell_individuals=PEOPLE)
    x, support, tc, ta = random_batch(seed=6)
    q = torch.tensor([0, 2, 3]), torch.tensor([1, 1, 3])
    big = extend_vocab(model, 7, 4, individuals=["bob", "cy"]).eval()
    assert big.cfg.cell_individuals == PEOPLE + ("bob", "cy")
    assert big.cell_group.tolist()[-2:] == [big.cell_group[2].item(), 2]  # bob, then a new one
    with torch.no_grad():  # unsupported new cells are no keys: old predictions stand
        np.testing.assert_allclose(big(x, support, tc, ta, *q).numpy(),
                                   model(x, support, tc, ta, *q).numpy(), rtol=1e-5, atol=1e-6)
        # A new cell of bob's attends to bob's cells, one of a new person to nobody's.
        out = big(x, support, tc, ta, torch.tensor([5, 6]), torch.tensor([0, 0])).numpy()
    np.testing.assert_allclose(out, numpy_forward(big, x, support, tc, ta, [5, 6], [0, 0]),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="new cells"):
        extend_vocab(model, 7, 4, individuals=["bob"])


def test_finetuning_keeps_the_individual_bias():
    """SPEC 2.7 freezes the attention; the bias is part of it (a new person has no logit
    of their own to learn)."""
    from edice_dist.trainloop import finetune_trainable

    model = extend_vocab(small_model(individual_bias=True, cell_individuals=PEOPLE), 6, 4,
                         individuals=["cy"])
    finetune_trainable(model, 5, 4)
    assert not model.individual_logit.requires_grad
    assert model.decoder[0].weight.requires_grad


@pytest.mark.parametrize("mode", ["mean", "attention"])
def test_same_assay_skip_matches_numpy_reference(mode):
    model = small_model(same_assay=mode)
    x, support, tc, ta = random_batch(n_bins=8, seed=7)
    support[:, ta == 2] = False  # an assay no cell observes: its skip term is 0
    qc = torch.tensor([0, 1, 4, 4, 2, 3])
    qa = torch.tensor([3, 0, 1, 2, 2, 0])
    with torch.no_grad():
        model.same_assay_skip.weight.zero_()
        without = model(x, support, tc, ta, qc, qa).numpy()
        model.same_assay_skip.weight.normal_()
        got = model(x, support, tc, ta, qc, qa).numpy()
    np.testing.assert_allclose(got, numpy_forward(model, x, support, tc, ta, qc, qa),
                               rtol=1e-4, atol=1e-4)
    # The skip is not a no-op for any target ...
    assert (np.abs(got - without)[:, qa != 2].max(axis=0) > 1e-3).all()
    np.testing.assert_allclose(got[:, qa == 2], without[:, qa == 2], rtol=1e-6)  # ... but here


def test_same_assay_skip_starts_as_the_papers_model():
    """Zero skip weights: a new model with the skip predicts as the same model without."""
    torch.manual_seed(4)
    a = EDICE(ModelConfig(5, 4, embed_dim=16, decoder_hidden=32, same_assay="attention"))
    torch.manual_seed(4)
    b = EDICE(ModelConfig(5, 4, embed_dim=16, decoder_hidden=32))
    x, support, tc, ta = random_batch(seed=2)
    q = torch.tensor([0, 2, 4]), torch.tensor([1, 1, 3])
    with torch.no_grad():
        np.testing.assert_array_equal(a.eval()(x, support, tc, ta, *q).numpy(),
                                      b.eval()(x, support, tc, ta, *q).numpy())


@pytest.mark.parametrize("same_assay", ["none", "attention"])
def test_per_bin_targets_match_reference(same_assay):
    model = small_model(decoder_layers=3, same_assay=same_assay)
    x, support, tc, ta = random_batch(n_bins=4, seed=3)
    rng = np.random.default_rng(0)
    qc = torch.from_numpy(rng.integers(0, 5, size=(4, 6)))
    qa = torch.from_numpy(rng.integers(0, 4, size=(4, 6)))
    with torch.no_grad():
        got = model(x, support, tc, ta, qc, qa).numpy()
    np.testing.assert_allclose(got, numpy_forward(model, x, support, tc, ta, qc, qa),
                               rtol=1e-4, atol=1e-5)


def test_training_skip_recomputed_in_blocks_matches_reference_and_kept_gradients(monkeypatch):
    """Past its memory budget the training term is recomputed per block of targets: the
    same predictions as the float64 reference, the same gradients as when kept."""
    from edice_dist import sameassay

    model = small_model(same_assay="attention").double()  # float64: no rounding to hide
    with torch.no_grad():
        model.same_assay_skip.weight.normal_()
    x, support, tc, ta = random_batch(n_bins=4, seed=3)
    x = x.double()
    rng = np.random.default_rng(0)
    qc = torch.from_numpy(rng.integers(0, 5, size=(4, 7)))
    qa = torch.from_numpy(rng.integers(0, 4, size=(4, 7)))
    calls = []
    real = sameassay.checkpoint
    monkeypatch.setattr(sameassay, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grads = {}
    for recompute, budget in ((False, 10**9), (True, 1)):
        monkeypatch.setattr(sameassay, "TRAIN_KEPT_BYTES", budget)
        model.same_assay_skip.recompute = recompute
        model.zero_grad()
        out = model(x, support, tc, ta, qc, qa)
        (out ** 2).sum().backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.grad is not None}
        np.testing.assert_allclose(out.detach().numpy(),
                                   numpy_forward(model, x, support, tc, ta, qc, qa),
                                   rtol=1e-4, atol=1e-5)
    assert len(calls) == 7  # one block per target at a 1-byte budget; none when kept
    assert "same_assay_skip.weight" in grads[True]
    for name, g in grads[False].items():  # sums in another order: rounding only
        torch.testing.assert_close(grads[True][name], g, rtol=1e-9, atol=1e-9)


def test_node_inputs_divide_by_support_counts():
    """SPEC 2.1 on a case worked by hand: 3 cells, 2 assays, 4 tracks, 2 bins."""
    model = small_model(n_cells=3, n_assays=2)
    tc = torch.tensor([0, 0, 1, 2])
    ta = torch.tensor([0, 1, 1, 0])
    x = torch.tensor([[2.0, 4.0, 6.0, 8.0],
                      [1.0, 3.0, 5.0, 7.0]])
    support = torch.tensor([[True, True, True, False],
                            [False, True, False, False]])
    y_c, y_a, nc, na = model.node_inputs(x, support, tc, ta)
    # bin 0: cell 0 has both assays (N=2), cell 1 assay 1 (N=1), cell 2 nothing.
    #        assay 0 has cell 0 (N=1); assay 1 has cells 0 and 1 (N=2).
    # bin 1: only (cell 0, assay 1) = 3.
    want_c = np.array([[[1.0, 2.0], [0.0, 6.0], [0.0, 0.0]],
                       [[0.0, 3.0], [0.0, 0.0], [0.0, 0.0]]])
    want_a = np.array([[[2.0, 0.0, 0.0], [2.0, 3.0, 0.0]],
                       [[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    np.testing.assert_allclose(y_c.numpy(), want_c)
    np.testing.assert_allclose(y_a.numpy(), want_a)
    np.testing.assert_array_equal(nc.numpy(), [[2, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(na.numpy(), [[1, 2], [0, 1]])


def test_node_inputs_match_numpy_on_random_data():
    model = small_model()
    x, support, tc, ta = random_batch(n_bins=9, seed=5)
    y_c, y_a, _, _ = model.node_inputs(x, support, tc, ta)
    xs = np.where(support.numpy(), x.numpy(), 0.0)
    for b in range(x.shape[0]):
        grid = np.zeros((5, 4))
        grid[tc.numpy(), ta.numpy()] = xs[b]
        n_c = np.bincount(tc.numpy(), weights=support[b].numpy(), minlength=5)
        n_a = np.bincount(ta.numpy(), weights=support[b].numpy(), minlength=4)
        np.testing.assert_allclose(y_c[b].numpy(), grid / np.maximum(n_c, 1)[:, None], rtol=1e-6)
        np.testing.assert_allclose(y_a[b].numpy(), grid.T / np.maximum(n_a, 1)[:, None], rtol=1e-6)


def test_prediction_is_invariant_to_support_order():
    model = small_model()
    x, support, tc, ta = random_batch(seed=7)
    qc, qa = torch.tensor([0, 2, 3]), torch.tensor([1, 1, 3])
    perm = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[1]))
    with torch.no_grad():
        a = model(x, support, tc, ta, qc, qa)
        b = model(x[:, perm], support[:, perm], tc[perm], ta[perm], qc, qa)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_masked_padding_changes_nothing():
    """Extra columns masked out, holding garbage (NaN, inf, huge values) and pointing at
    cells and assays that also have real supports, or none."""
    model = small_model()
    x, support, tc, ta = random_batch(seed=11)
    qc, qa = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 0])
    n_pad = 7
    rng = np.random.default_rng(2)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -5.0, 3.0, 0.0])
    x_pad = torch.cat([x, garbage.repeat(x.shape[0], 1)], dim=1)
    s_pad = torch.cat([support, torch.zeros(x.shape[0], n_pad, dtype=torch.bool)], dim=1)
    tc_pad = torch.cat([tc, torch.cat([tc[:3], torch.from_numpy(rng.integers(0, 5, 4))])])
    ta_pad = torch.cat([ta, torch.cat([ta[:3], torch.from_numpy(rng.integers(0, 4, 4))])])
    with torch.no_grad():
        a = model(x, support, tc, ta, qc, qa)
        b = model(x_pad, s_pad, tc_pad, ta_pad, qc, qa)
    assert torch.isfinite(b).all()
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)


def test_cell_without_supports_gets_prediction_from_its_global_embedding():
    model = small_model()
    x, support, tc, ta = random_batch(seed=13, p_obs=0.9)
    support[:, tc == 2] = False  # cell 2 has no support at any bin
    qc, qa = torch.tensor([2, 2, 0]), torch.tensor([0, 3, 1])
    with torch.no_grad():
        pred = model(x, support, tc, ta, qc, qa)
        y_c, _, nc, _ = model.node_inputs(x, support, tc, ta)
        h = model.cell_embed(y_c)
    assert torch.isfinite(pred).all()
    assert (nc[:, 2] == 0).all()
    # Its embedding is the global one plus ReLU(b_C): no signal term.
    want = (torch.relu(model.cell_embed.linear.bias) + model.cell_embed.table.weight[2]).detach()
    np.testing.assert_allclose(h[:, 2].numpy(), want.expand(x.shape[0], -1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(pred.numpy(), numpy_forward(model, x, support, tc, ta, qc, qa),
                               rtol=1e-4, atol=1e-5)
    # The global row is what carries it: change it and only cell 2's predictions move.
    with torch.no_grad():
        model.cell_embed.table.weight[2] += 0.5
        moved = model(x, support, tc, ta, qc, qa)
    assert not torch.allclose(moved[:, :2], pred[:, :2])
    np.testing.assert_allclose(moved[:, 2].numpy(), pred[:, 2].numpy(), rtol=1e-6)


def test_bin_without_any_support_is_finite():
    model = small_model()
    x, support, tc, ta = random_batch(seed=17)
    support[1] = False
    with torch.no_grad():
        pred = model(x, support, tc, ta, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert torch.isfinite(pred).all()
    np.testing.assert_allclose(pred.numpy(),
                               numpy_forward(model, x, support, tc, ta, [0, 1], [2, 3]),
                               rtol=1e-4, atol=1e-5)


def test_queries_only_for_the_targets_cells_and_assays(monkeypatch):
    model = small_model(n_cells=7, n_assays=6)
    x, support, tc, ta = random_batch(n_cells=7, n_assays=6, seed=19)
    seen = {}

    def spy(block, name):
        orig = block.forward

        def fwd(h, has_key, query, bias=None):
            seen[name] = query.clone()
            return orig(h, has_key, query, bias)
        monkeypatch.setattr(block, "forward", fwd)

    spy(model.cell_context, "cells")
    spy(model.assay_context, "assays")
    qc = torch.tensor([[5, 1], [1, 1]])
    qa = torch.tensor([[0, 4], [4, 0]])
    with torch.no_grad():
        pred = model(x[:2], support[:2], tc, ta, qc, qa)
    assert seen["cells"].tolist() == [1, 5]
    assert seen["assays"].tolist() == [0, 4]
    np.testing.assert_allclose(pred.numpy(),
                               numpy_forward(model, x[:2], support[:2], tc, ta, qc, qa),
                               rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training_mode():
    model = small_model()
    x, support, tc, ta = random_batch(seed=23)
    q = (torch.tensor([0, 1]), torch.tensor([1, 2]))
    with torch.no_grad():
        a, b = model(x, support, tc, ta, *q), model(x, support, tc, ta, *q)
        model.train()
        torch.manual_seed(0)
        c = model(x, support, tc, ta, *q)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_mask_is_inverted_dropout_and_seeded(p):
    torch.manual_seed(5)
    k = keep_mask(torch.Size([400, 1001]), p, torch.device("cpu"))
    assert k.shape == (400, 1001) and k.dtype == torch.float32
    m = k == 0
    assert abs(m.double().mean().item() - p) < 0.005  # binomial sd ~0.0007
    # Every one of the four 16-bit draws taken from a 64-bit draw is fair.
    for j in range(4):
        assert abs(m.flatten()[j::4].double().mean().item() - p) < 0.01
    # Elements are independent: no visible correlation between neighbours.
    z = m.double().flatten().numpy()
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01
    np.testing.assert_allclose(k[~m].numpy(), 1 / (1 - p), rtol=1e-4)
    assert abs(k.double().mean().item() - 1) < 0.01  # expectation kept
    torch.manual_seed(5)
    assert torch.equal(k, keep_mask(torch.Size([400, 1001]), p, torch.device("cpu")))


def test_training_decoder_is_inverted_dropout_after_each_relu():
    """The decoder in training mode equals dropout(relu(.)) with 1/(1-p) scaling after each
    hidden layer, computed here by hand with the same random draws; its gradient too."""
    model = small_model(decoder_layers=2).train()
    z = torch.randn(7, 5, 32, requires_grad=True)
    torch.manual_seed(3)
    out = model.decode_hidden(z.clone())
    torch.manual_seed(3)
    h = torch.relu(z) * keep_mask(z.shape, 0.3, z.device)
    h = torch.relu(model.decoder[1](h))
    h = h * keep_mask(h.shape, 0.3, h.device)
    want = model.output(h).squeeze(-1)
    np.testing.assert_allclose(out.detach().numpy(), want.detach().numpy(), rtol=1e-4, atol=1e-6)
    g = torch.randn_like(out)
    (gz,) = torch.autograd.grad(out, z, g)
    (gw,) = torch.autograd.grad(want, z, g)
    np.testing.assert_allclose(gz.numpy(), gw.numpy(), rtol=1e-4, atol=1e-6)
    model.eval()
    e = model.decode_hidden(z.detach().clone())
    h = torch.relu(model.decoder[1](torch.relu(z.detach())))
    np.testing.assert_allclose(e.detach().numpy(), model.output(h).squeeze(-1).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("same_assay", ["none", "attention"])
def test_extend_vocab_keeps_old_predictions(same_assay):
    model = small_model(same_assay=same_assay)
    x, support, tc, ta = random_batch(seed=29)
    qc, qa = torch.tensor([0, 3, 4]), torch.tensor([1, 0, 3])
    big = extend_vocab(model, 7, 6).eval()
    assert (big.cfg.n_cells, big.cfg.n_assays) == (7, 6)
    with torch.no_grad():
        np.testing.assert_allclose(big(x, support, tc, ta, qc, qa).numpy(),
                                   model(x, support, tc, ta, qc, qa).numpy(), rtol=1e-6)
        old_rows = model.cell_embed.table.weight
        np.testing.assert_allclose(big.cell_embed.table.weight[5:].numpy(),
                                   old_rows.mean(0).expand(2, -1).numpy(), rtol=1e-6)
        assert (big.cell_embed.linear.weight[:, 4:] == 0).all()
        assert (big.assay_embed.linear.weight[:, 5:] == 0).all()
        # New nodes can be targets.
        assert torch.isfinite(big(x, support, tc, ta, torch.tensor([6]), torch.tensor([5]))).all()
        if same_assay != "none":  # a new assay's read-out starts at the old ones' mean
            w = model.same_assay_skip.weight
            np.testing.assert_allclose(big.same_assay_skip.weight[4:].numpy(),
                                       w.mean(0).expand(2, -1, -1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="only grows"):
        extend_vocab(model, 4, 4)
    # A new individual's tissue may start from that tissue's rows in other individuals.
    like = extend_vocab(model, 7, 5, like=[[1, 3], []])
    rows = model.cell_embed.table.weight
    assert torch.allclose(like.cell_embed.table.weight[5], rows[[1, 3]].mean(0))
    assert torch.allclose(like.cell_embed.table.weight[6], rows.mean(0))


def test_model_on_device(device):
    """CPU vs the device (CUDA when present); bf16 autocast stays close on CUDA."""
    model = small_model()
    x, support, tc, ta = random_batch(seed=31)
    qc, qa = torch.tensor([0, 1, 2]), torch.tensor([3, 2, 1])
    with torch.no_grad():
        ref = model(x, support, tc, ta, qc, qa)
        dev = model.to(device)
        args = [t.to(device) for t in (x, support, tc, ta, qc, qa)]
        got = dev(*args).cpu()
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-3, atol=1e-4)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = dev(*args).float().cpu()
            np.testing.assert_allclose(low.numpy(), ref.numpy(), rtol=5e-2, atol=5e-2)
