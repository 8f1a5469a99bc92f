"""The stage runner: every stage option reaches its stage, typed, whichever way the stage
is run (`edice <stage>`, `edice pipeline`/`benchmark-quality`, a cluster job config), and
an unknown or unsupported option is refused by each of them with the valid ones listed."""

from __future__ import annotations

import json

import pytest
import yaml

from edice_dist import _faults, cli
from edice_dist.errors import InputError
from edice_dist.jobconfig import load_job_config, run_stages, stages_for
from edice_dist.trainconfig import load_config

STAGE_FUNCTIONS = {
    "simulate": ("edice_dist.simulate", "simulate"),
    "ingest": ("edice_dist.ingest", "ingest"),
    "train": ("edice_dist.train", "train"),
    "impute": ("edice_dist.impute", "impute"),
    "export": ("edice_dist.export", "export"),
    "evaluate": ("edice_dist.evaluate", "evaluate"),
}


@pytest.fixture
def calls(monkeypatch):
    """Stand-ins for every stage function (and for starting Ray): ``{stage: [(args,
    kwargs), ...]}`` of how they were called."""
    import importlib

    seen: dict[str, list] = {}
    for stage, (module, fn) in STAGE_FUNCTIONS.items():
        def fake(*a, _stage=stage, **k):
            seen.setdefault(_stage, []).append((a, k))
            return {}
        monkeypatch.setattr(importlib.import_module(module), fn, fake)
    monkeypatch.setattr("edice_dist.raycluster.init",
                        lambda *a, **k: seen.setdefault("ray", []).append(a))
    return seen


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _pipeline(tmp_path, *options, simulate=False):
    out = tmp_path / "pipe"
    if simulate:
        return ["benchmark-quality", out, "--seed", "3", *options]
    return ["pipeline", "--manifest", tmp_path / "m.tsv", "--chrom-sizes", tmp_path / "c.sizes",
            "--out", out, "--truth", tmp_path / "truth.tsv", *options]


def _job(tmp_path, **sections) -> dict:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "job"),
                                    "manifest": str(tmp_path / "m.tsv"),
                                    "chrom_sizes": str(tmp_path / "c.sizes"), **sections}))
    cfg = load_job_config(str(path))
    run_stages(cfg, stages_for("pipeline", cfg))
    return cfg


def _only(calls, stage):
    assert len(calls[stage]) == 1, calls.get(stage)
    return calls.pop(stage)[0]


# ----------------------------------------------------------------------------- each stage


def test_simulate_options_reach_simulate(calls, tmp_path, capsys):
    def check(args):
        cfg = args[0][1]
        assert (cfg.n_cell_types, cfg.seed, cfg.force) == (5, 3, True)

    assert _cli(["simulate", tmp_path / "s", "--seed", "3", "--n_cell_types=5", "--force"],
                capsys)[0] == 0
    check(_only(calls, "simulate"))
    assert _cli(_pipeline(tmp_path, "--sim.n_cell_types=5", "--sim.force=yes", simulate=True),
                capsys)[0] == 0
    check(_only(calls, "simulate"))
    _job(tmp_path, simulate={"n_cell_types": 5, "seed": 3, "force": True})
    check(_only(calls, "simulate"))


def test_ingest_options_reach_ingest(calls, tmp_path, capsys):
    want = {"chroms": ["chr1", "chr2"], "chunk_bins": 512, "dtype": "float32", "workers": 3,
            "force": True}

    assert _cli(["ingest", tmp_path / "m.tsv", "--chrom-sizes", tmp_path / "c.sizes", "--out",
                 tmp_path / "s", "--chroms", "chr1", "chr2", "--chunk-bins", "512", "--dtype",
                 "float32", "--workers", "3", "--force"], capsys)[0] == 0
    assert _only(calls, "ingest")[1] == want
    assert _cli(_pipeline(tmp_path, "--ingest.chroms=chr1,chr2", "--ingest.chunk_bins=512",
                          "--ingest.dtype=float32", "--ingest.workers=3", "--ingest.force"),
                capsys)[0] == 0
    assert _only(calls, "ingest")[1] == want
    _job(tmp_path, ingest=want)
    assert _only(calls, "ingest")[1] == want


def test_train_options_reach_train(calls, tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("lr: 0.001\nbatch_size: 64\n")

    def check(args, resume):
        a, k = args
        cfg = a[2]
        assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.use_gpu, cfg.workers, cfg.seed) == \
            (2, 0.001, 64, False, 3, 7)
        assert k == {"resume": resume}

    assert _cli(["train", "--store", tmp_path / "s", "--out", tmp_path / "m", "--config",
                 tmp_path / "t.yaml", "--epochs=2", "--use_gpu=false", "--workers", "3",
                 "--seed=7", "--resume"], capsys)[0] == 0
    check(_only(calls, "train"), True)
    assert _cli(_pipeline(tmp_path, f"--train.config_file={tmp_path / 't.yaml'}",
                          "--train.epochs=2", "--train.use_gpu=false", "--train.workers=3",
                          "--train.seed=7"), capsys)[0] == 0
    check(_only(calls, "train"), False)
    _job(tmp_path, train={"config_file": "t.yaml", "epochs": 2, "use_gpu": False,
                          "workers": 3, "seed": 7, "resume": True})
    check(_only(calls, "train"), True)


def test_impute_options_reach_impute(calls, tmp_path, capsys):
    want = {"targets": "A:H3K27ac", "chroms": ["chr1", "chr2"], "force": True, "workers": 2,
            "gpus": 0, "batch_bins": 128, "dtype": "float32", "space": "arcsinh",
            "export": False, "hub": False, "genome": "hg19", "hub_observed": "link",
            "hub_email": "me@lab.org", "uncertainty": 4}

    assert _cli(["impute", "--store", tmp_path / "s", "--model", tmp_path / "m", "--out",
                 tmp_path / "r", "--targets", "A:H3K27ac", "--chroms", "chr1", "chr2", "--force",
                 "--workers", "2", "--gpus", "0", "--batch-bins", "128", "--dtype", "float32",
                 "--space", "arcsinh", "--no-export", "--no-hub", "--genome", "hg19",
                 "--hub-observed", "link", "--hub-email", "me@lab.org", "--uncertainty", "4"],
                capsys)[0] == 0
    assert _only(calls, "impute")[1] == want
    # The bug of issue 11: --impute.gpus, .space and .chroms were accepted and ignored.
    assert _cli(_pipeline(tmp_path, "--impute.targets=A:H3K27ac", "--impute.chroms=chr1,chr2",
                          "--impute.force", "--impute.workers=2", "--impute.gpus=0",
                          "--impute.batch_bins=128", "--impute.dtype=float32",
                          "--impute.space=arcsinh", "--impute.export=false",
                          "--impute.hub=false", "--impute.genome=hg19",
                          "--impute.hub_observed=link", "--impute.hub_email=me@lab.org",
                          "--impute.uncertainty=4"),
                capsys)[0] == 0
    assert _only(calls, "impute")[1] == want
    _job(tmp_path, impute={**want, "chroms": "chr1 chr2"})
    assert _only(calls, "impute")[1] == want


def test_evaluate_and_export_options_reach_their_stage(calls, tmp_path, capsys):
    assert _cli(["evaluate", "--truth", tmp_path / "t.tsv", "--imputed", tmp_path / "bw",
                 "--space", "pval", "--no-plots"], capsys)[0] == 0
    a, k = _only(calls, "evaluate")
    assert k == {"store": None, "out": None, "space": "pval", "plots": False,
                 "start_ray_from": 16}  # a consortium's evaluation runs on Ray
    assert _cli(_pipeline(tmp_path, "--evaluate.space=pval", "--evaluate.plots=false"),
                capsys)[0] == 0
    a, k = _only(calls, "evaluate")
    assert (k["space"], k["plots"], a[1]) == ("pval", False, str(tmp_path / "pipe/run/bigwig"))
    _job(tmp_path, evaluate={"truth": "t.tsv", "space": "pval", "plots": False})
    a, k = _only(calls, "evaluate")
    assert (a[0], k["space"], k["plots"]) == (str(tmp_path / "t.tsv"), "pval", False)

    assert _cli(["export", tmp_path / "r", "--space", "arcsinh", "--force", "--workers", "2",
                 "--genome", "mm10", "--hub-observed", "copy"], capsys)[0] == 0
    assert _only(calls, "export") == ((str(tmp_path / "r"),),
                                      {"space": "arcsinh", "force": True, "workers": 2,
                                       "hub": True, "genome": "mm10", "hub_observed": "copy",
                                       "hub_email": "nobody@example.org"})
    assert _cli(["export", tmp_path / "r", "--no-hub"], capsys)[0] == 0
    assert _only(calls, "export")[1]["hub"] is False
    rc, err = _cli(["export", tmp_path / "r", "--hub-observed", "move"], capsys)
    assert rc == 1 and "--hub-observed must be one of none, link, copy" in err


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("option, words", [
    ("--impute.gpu=0", ["Unknown impute option '--impute.gpu'", "Valid options: targets",
                        "gpus", "batch_bins"]),
    ("--train.epochz=3", ["Unknown config key '--train.epochz'", "Valid keys", "epochs"]),
    ("--ingest.chunkbins=3", ["Unknown ingest option", "chunk_bins", "dtype"]),
    ("--evaluate.spaec=pval", ["Unknown evaluate option", "space", "plots"]),
    ("--impute.batch_bins=x", ["--impute.batch_bins must be an integer", "'x'"]),
    ("--impute.space=log", ["--impute.space must be one of pval, arcsinh", "'log'"]),
    ("--train.lr=fast", ["--train.lr must be a number", "'fast'"]),
    ("--sim.seed=3", ["--sim.seed is for the simulate stage", "does not run",
                      "ingest, train, impute, evaluate"]),
    ("--imptue.gpus=0", ["Unknown option --imptue.gpus", "--impute.KEY=VALUE"]),
    ("--gpus=0", ["Unknown option --gpus", "prefixed by stage"]),
])
def test_pipeline_refuses_bad_options_before_any_work(option, words, calls, tmp_path, capsys):
    rc, err = _cli(_pipeline(tmp_path, "--impute.gpus=0", option), capsys)
    assert rc == 1
    assert err.startswith("edice pipeline: error:") and err.count("\n") == 1  # one paragraph
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not calls  # nothing ran, not even Ray


def test_options_of_a_stage_that_does_not_run_are_refused(calls, tmp_path, capsys):
    argv = ["pipeline", "--manifest", tmp_path / "m.tsv", "--chrom-sizes", tmp_path / "c",
            "--out", tmp_path / "o", "--evaluate.space=pval"]
    rc, err = _cli(argv, capsys)
    assert rc == 1 and "--evaluate.space is for the evaluate stage" in err and "--truth" in err
    assert not calls


def test_job_and_command_line_refuse_the_same_option(calls, tmp_path, capsys):
    """An option is refused by a job config as by the command line."""
    with pytest.raises(InputError, match="Unknown impute option 'impute.gpu'"):
        _job(tmp_path, impute={"gpu": 0})
    rc, err = _cli(["impute", "--store", "s", "--model", "m", "--out", "r", "--gpu", "0"],
                   capsys)
    assert rc == 2 and "--gpu" in err  # argparse: the command has no such flag
    with pytest.raises(InputError, match="impute.batch_bins must be an integer"):
        _job(tmp_path, impute={"batch_bins": "x"})
    rc, err = _cli(["impute", "--store", "s", "--model", "m", "--out", "r", "--batch-bins", "x"],
                   capsys)
    assert rc == 1 and "--batch-bins must be an integer or auto; 'x' is not a valid integer" in err
    assert not calls


def test_faults_are_not_options(calls, tmp_path, capsys, monkeypatch):
    """Fault injection is for tests, through EDICE_TEST_FAULTS only."""
    rc, err = _cli(["train", "--store", "s", "--out", "m", "--_fail_at_epoch=2"], capsys)
    assert rc == 1 and "Unknown config key '--_fail_at_epoch'" in err
    (tmp_path / "c.json").write_text(json.dumps({"_fail_at_epoch": 2}))
    with pytest.raises(InputError, match="_fail_at_epoch"):
        load_config(str(tmp_path / "c.json"))
    rc, err = _cli(["impute", "--store", "s", "--model", "m", "--out", "r", "--_hooks=x"],
                   capsys)
    assert rc == 2
    monkeypatch.setenv(_faults.ENV, json.dumps({"train_exit_epoch": 2}))
    assert _faults.active() == {"train_exit_epoch": 2}
    monkeypatch.setenv(_faults.ENV, json.dumps({"train_exit_epcoh": 2}))
    with pytest.raises(ValueError, match="train_exit_epoch"):
        _faults.active()
    assert not calls
