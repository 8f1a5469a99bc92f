"""Personalised imputation (`edice personal`): both workflows on a tiny simulated
consortium of individuals; no hidden track reaches the model that imputes it (checked on
what each model folder records its worker read); an interrupted run resumes without
redoing finished units; the person-specific peaks and their AUPRC."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from edice_dist import cli, stages, storage
from edice_dist.checkpoint import describe, load_model
from edice_dist.errors import EdiceError, InputError
from edice_dist.genome import bed_bin_mask
from edice_dist.metrics import metrics_from_arrays
from edice_dist.personpeaks import intervals, keep_runs, person_specific

TINY = {"embed_dim": "8", "n_heads": "2", "ffn_dim": "8", "decoder_hidden": "16",
        "context": "4", "epochs": "1", "bins_per_epoch": "512", "batch_size": "128",
        "val_bins": "512", "lr": "1e-3", "finetune_epochs": "1", "plots": "false"}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, ray_local):
    """3 individuals x 3 tissues x 4 assays over 100 kb, ingested."""
    root = str(tmp_path_factory.mktemp("personal"))
    stages.run_stage("simulate", {"out": f"{root}/sim"}, {
        "seed": "4", "individuals": "3", "n_cell_types": "3", "n_tissues": "3",
        "individual_cell_fraction": "1", "private_rate": "150", "n_test": "2",
        "chrom_sizes": "chr1:60007,chr2:40009", "assays": "H3K4me3,H3K27ac,H3K4me1,DNase",
        "core_assays": "H3K4me3,H3K27ac", "other_fraction": "0.8", "zoom_levels": "0"})
    stages.run_stage("ingest", {"manifest": f"{root}/sim/manifest.tsv",
                                "chrom_sizes": f"{root}/sim/chrom.sizes",
                                "out": f"{root}/store"}, {"chunk_bins": "2048"})
    return root


def _records(out: str) -> list[dict]:
    found = []
    for dirpath, _, files in os.walk(out):
        if "record.json" in files:
            found.append(json.loads(open(os.path.join(dirpath, "record.json")).read()))
    return found


def _seen(data: dict) -> set[str]:
    """Every track a model's worker read, and its base model's."""
    tracks = {t for part in data["data"].values() for t in part["tracks"]}
    return tracks | (_seen(data["parent"]) if "parent" in data else set())


def _check_no_leak(out: str, store_tracks: list[dict]) -> int:
    """Assert from each model folder's own record that no model of a fold read a hidden
    track (as input, target or validation track), nor did its base model, and that no
    prediction used one as a support; return the number of models checked."""
    n = 0
    for rec in _records(out):
        hidden = set(rec["hidden"])
        donor = rec["unit"].split("/")[0]
        for kind, model in rec["models"].items():
            assert not hidden & _seen(model["data"]), (rec["unit"], kind)
            assert not hidden & set(rec["predictions"][kind]["supports"]), (rec["unit"], kind)
            data = model["data"]["data"]
            own = {t["track_id"] for t in store_tracks if t.get("individual") == donor}
            if kind == "others":  # the other donors only
                assert not own & set(data["inputs"]["tracks"])
            if kind == "finetuned":  # fine-tuned on the donor: its tracks are the targets
                assert set(data["targets"]["tracks"]) <= own - hidden
                assert set(data["val"]["tracks"]) <= own - hidden
                assert not own & _seen(model["data"]["parent"])
            n += 1
    return n


def test_leave_one_out_resumes_and_never_shows_a_model_its_hidden_track(
        consortium, tmp_path, monkeypatch):
    out = str(tmp_path / "loo")
    paths = {"store": f"{consortium}/store", "out": out,
             "truth": f"{consortium}/sim/truth/observed.tsv"}
    opts = {**TINY, "donors": "ind01,ind02", "folds": "2", "models": "finetuned"}
    log = tmp_path / "units.log"

    def run(**more):
        before = log.read_text().split() if log.exists() else []
        res = stages.run_stage("leave-one-out", paths, {**opts, **more})
        return res, log.read_text().split()[len(before):]

    # Interrupted mid-run: one of ind02's units fails after others have finished.
    monkeypatch.setenv("EDICE_TEST_FAULTS", json.dumps(
        {"personal_fail_unit": "ind02/fold-2/finetuned", "personal_log": str(log)}))
    with pytest.raises(EdiceError, match="ind02/fold-2/finetuned"):
        stages.run_stage("leave-one-out", paths, opts)
    done = {p.relative_to(tmp_path / "loo" / "_done").as_posix()
            for p in (tmp_path / "loo" / "_done").rglob("*") if p.is_file()}
    # The failing unit starts only after its base model is done (and kept).
    assert "ind02/others" in done and "ind02/fold-2/finetuned" not in done

    monkeypatch.setenv("EDICE_TEST_FAULTS", json.dumps({"personal_log": str(log)}))
    res, second = run()
    assert set(res["ran"]) == set(second) and not done & set(second)  # nothing redone
    assert "ind02/fold-2/finetuned" in second and len(res["units"]) == 10
    # A model added later: only it is trained, and the folds are evaluated again.
    res, third = run(models="finetuned,alldonors")
    assert sorted(third) == sorted(f"{d}/fold-{k}/{u}" for d in ("ind01", "ind02")
                                   for k in (1, 2) for u in ("alldonors", "evaluate"))
    assert len(res["units"]) == 14
    assert run(models="finetuned,alldonors")[1] == []  # then nothing is left to do

    store_tracks = json.loads(open(f"{consortium}/store/zarr.json").read())["attributes"]["tracks"]
    assert _check_no_leak(out, store_tracks) == 4 * 3
    hidden = {h for r in _records(out) for h in r["hidden"]}
    own = {t["track_id"] for t in store_tracks if t["individual"] in ("ind01", "ind02")}
    assert hidden == own  # every observed track of both donors, each in one fold

    rows = [r.split("\t") for r in open(f"{out}/metrics.tsv").read().splitlines()]
    head = rows[0]
    assert head[:6] == ["donor", "fold", "cell_type", "individual", "assay", "method"]
    assert head[-2:] == ["auprc_person", "person_frac"]
    methods = {r[5] for r in rows[1:]}
    assert methods == {"finetuned", "others", "alldonors", "AVG", "TrackAVG"}
    by = {(r[2], r[3], r[4], r[5]): dict(zip(head, r, strict=True)) for r in rows[1:]}
    for key, r in by.items():
        assert np.isfinite(float(r["mse"])), key
        chance = float(r["person_frac"])
        assert 0 <= chance < 0.5
        # The chance level is the truth's: one value per track whatever the method.
        assert chance == float(by[(*key[:3], "TrackAVG")]["person_frac"]) or \
            (*key[:3], "TrackAVG") not in by
    assert os.path.exists(f"{out}/report.html")

    # Other settings in the same folder are refused.
    with pytest.raises(InputError, match="other settings"):
        stages.run_stage("leave-one-out", paths, {**opts, "folds": "3"})


def test_leave_tissue_out_on_the_command_line(consortium, tmp_path, capsys):
    out = str(tmp_path / "lto")
    keys = [f"--{k}={v}" for k, v in TINY.items() if k not in ("finetune_epochs", "plots")]
    code = cli.main(["personal", "leave-tissue-out", "--store", f"{consortium}/store",
                     "--out", out, "--donors", "ind03", "--cell-types", "brain_01",
                     "--finetune-epochs", "1", *keys])
    assert code == 0, capsys.readouterr().err
    assert "finetuned beats TrackAVG" in open(f"{out}/report.html").read()
    store_tracks = json.loads(open(f"{consortium}/store/zarr.json").read())["attributes"]["tracks"]
    assert _check_no_leak(out, store_tracks) == 3
    (rec,) = _records(out)
    tissue = {t["track_id"] for t in store_tracks
              if t["individual"] == "ind03" and t["cell_type"] == "brain_01"}
    assert set(rec["hidden"]) == tissue and len(tissue) >= 2
    # The hidden tissue is not even in the vocabulary of the models of the fold: it is
    # imputed through a row made from the same tissue of the other donors.
    for kind in ("finetuned", "alldonors"):
        meta = json.loads(storage.read_text(f"{out}/ind03/tissue-brain_01/{kind}/model.json"))
        assert "brain_01@ind03" not in meta["cell_keys"]
    # The models know whose each cell is: the donor's `others` model learns the individual
    # bias from the other donors, and fine-tuning keeps it as it is (SPEC 2.7).
    base, base_meta = load_model(f"{out}/ind03/others")
    tuned, tuned_meta = load_model(f"{out}/ind03/tissue-brain_01/finetuned")
    for model, meta in ((base, base_meta), (tuned, tuned_meta)):
        assert model.cfg.cell_individuals == tuple(k.split("@")[1] for k in meta["cell_keys"])
    assert "ind03" not in base.cfg.cell_individuals and "ind03" in tuned.cfg.cell_individuals
    assert base.individual_logit.abs().max() > 0
    assert torch.equal(tuned.individual_logit, base.individual_logit)
    info = describe(f"{out}/ind03/tissue-brain_01/finetuned")
    assert "individuals  3 (ind01, ind02, ind03), with the individual attention bias" in info
    out_text = capsys.readouterr().out
    assert "auprc_per" in out_text and "TrackAVG" in out_text
    # Bad options are one paragraph naming what is valid.
    assert cli.main(["personal", "leave-tissue-out", "--store", f"{consortium}/store",
                     "--out", str(tmp_path / "x"), "--donors", "nobody"]) != 0
    assert "not an individual" in capsys.readouterr().err


def test_person_specific_peaks_and_their_auprc():
    own = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
    other = np.zeros_like(own)
    other[5:7] = True  # splits own's first peak into runs of 4 and 1 bins
    q = person_specific(own, [other], 3)
    assert q.tolist() == keep_runs(own & ~other, 3).tolist()
    assert np.flatnonzero(q).tolist() == [1, 2, 3, 4, 12, 13, 14, 15, 16, 17]
    iv = intervals(q, 18 * 25 - 10)
    assert iv.tolist() == [[25, 125], [300, 440]]  # the last clipped to the chromosome
    assert bed_bin_mask(iv, 0, 18).tolist() == q.tolist()
    rng = np.random.default_rng(0)
    t = rng.random(400).astype(np.float32)
    y = (t + rng.normal(0, 0.5, 400)).astype(np.float32)
    p, person = t > 0.7, t > 0.9
    m = metrics_from_arrays(t, y, p, chunk_size=64, person=person, run_size=100)
    assert m["auprc_person"] == pytest.approx(metrics_from_arrays(t, y, person)["auprc"])
    assert m["person_frac"] == pytest.approx(person.mean())
    assert m["auprc"] == pytest.approx(metrics_from_arrays(t, y, p)["auprc"])
    assert "auprc_person" not in metrics_from_arrays(t, y, p)


def test_the_plan_and_its_cost():
    """Units per donor and fold, dependencies first; a donor without a chosen tissue has
    no fold for it (and no model); a name no donor has is refused."""
    from types import SimpleNamespace

    from edice_dist.personal import cost_line, plan_units
    from edice_dist.stages import LeaveOneOutOptions, LeaveTissueOutOptions
    from edice_dist.tracks import Track

    tracks = [Track(ct, a, individual=i) for i in ("d1", "d2", "d3")
              for ct in ("liver", "lung") for a in ("A", "B", "C")
              if not (i == "d3" and ct == "lung")]
    st = SimpleNamespace(tracks=tracks, path="store",
                         track_ids=lambda: [t.track_id for t in tracks])
    models = ["finetuned", "others", "alldonors"]
    units, notes = plan_units(st, "leave-tissue-out",
                              LeaveTissueOutOptions(cell_types=["lung"], models=models))
    assert [u.id for u in units if u.kind == "evaluate"] == \
        ["d1/tissue-lung/evaluate", "d2/tissue-lung/evaluate"]  # d3 has no lung
    assert "d3/others" not in {u.id for u in units} and not notes
    seen: set[str] = set()
    for u in units:  # every unit after what it needs
        assert set(u.needs) <= seen
        seen.add(u.id)
    assert cost_line(units) == ("6 models to train (2 others, 2 finetuned, 2 alldonors) "
                                "and 2 folds to evaluate")
    one = plan_units(st, "leave-one-out", LeaveOneOutOptions(donors=["d3"], models=models))[0]
    assert cost_line(one) == ("7 models to train (1 others, 3 finetuned, 3 alldonors) and 3 "
                              "folds to evaluate")
    folds = plan_units(st, "leave-one-out",
                       LeaveOneOutOptions(donors=["d1"], folds=2, models=models))[0]
    hidden = [set(u.hidden) for u in folds if u.kind == "evaluate"]
    assert len(hidden) == 2 and not hidden[0] & hidden[1] and len(hidden[0] | hidden[1]) == 6
    with pytest.raises(InputError, match="heart"):
        plan_units(st, "leave-tissue-out", LeaveTissueOutOptions(cell_types=["heart"],
                                                                 models=models))
