"""The moving average of the weights (``average_decay``): its arithmetic, that validation
scores it and checkpoints give it as the model, and that a resumed run continues it
exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from trainstore import SMALL, epoch_state, load_pt, make_store, same_weights

from edice_dist import trainloop
from edice_dist.model import EDICE, ModelConfig
from edice_dist.train import train
from edice_dist.trainconfig import load_config

TINY = {"embed_dim": "16", "n_heads": "2", "ffn_dim": "16", "decoder_hidden": "64",
        "batch_size": "64", "val_bins": "1000", "workers": "1", "cpus_per_worker": "1",
        "seed": "5", "bins_per_epoch": "1024", "patience": "5", "refit": "false",
        "average_decay": "0.9"}


def test_average_follows_the_moving_average_recurrence():
    """Against the recurrence in numpy, with the warm-up d_n = min(decay, (1+n)/(10+n)):
    a missing warm-up (d = decay from the first step) or a swapped lerp fails here."""
    torch.manual_seed(0)
    net = EDICE(ModelConfig(n_cells=3, n_assays=2, embed_dim=8, n_heads=2, ffn_dim=8,
                            decoder_hidden=16))
    avg = trainloop.WeightAverage(net, decay=0.9)
    params = list(net.parameters())
    expect = [p.detach().double().numpy().copy() for p in params]
    rng = np.random.default_rng(1)
    for n in range(1, 41):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        expect = [d * e + (1 - d) * p.detach().double().numpy()
                  for e, p in zip(expect, params, strict=True)]
    got = [p.detach().double().numpy() for p in avg.model.parameters()]
    for g, e in zip(got, expect, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    # The trained weights are left as they were set.
    assert not np.allclose(got[0], params[0].detach().numpy())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("avg") / "store")
    make_store(path, **SMALL)
    return path


def test_validation_scores_the_average_and_a_resume_continues_it(store, ray_local, tmp_path,
                                                                 monkeypatch):
    scored = []
    real = trainloop._validate

    def spy(net, *args, **kw):
        scored.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return real(net, *args, **kw)

    monkeypatch.setattr(trainloop, "_validate", spy)  # one worker: trains in this process
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(store, a, load_config(None, {**TINY, "epochs": "2"}))
    train(store, a, load_config(None, {**TINY, "epochs": "3"}), resume=True)
    scored_a = list(scored)
    train(store, b, load_config(None, {**TINY, "epochs": "3"}))

    kept = [int(e.split("_")[1]) for r in os.listdir(os.path.join(a, "ray"))
            for e in os.listdir(os.path.join(a, "ray", r)) if e.startswith("epoch_")]
    assert 3 in kept
    for epoch in kept:
        ck = epoch_state(a, epoch)
        # What validation scored is the checkpoint's model, and that is the average, not
        # the weights that train on.
        assert same_weights(scored_a[epoch - 1], ck["model"])
        assert not same_weights(ck["model"], ck[trainloop.TRAIN_MODEL])
        assert ck["average_updates"] == epoch * 1024 // 64
    # 2 epochs, then a resume to 3, is 3 epochs at once: both weights, bit for bit.
    ca, cb = epoch_state(a, 3), epoch_state(b, 3)
    assert same_weights(ca["model"], cb["model"])
    assert same_weights(ca[trainloop.TRAIN_MODEL], cb[trainloop.TRAIN_MODEL])
    best = load_pt(os.path.join(b, "model.pt"))
    assert same_weights(best["state_dict"], epoch_state(b, best["meta"]["epoch"])["model"])
