"""Failures a user can meet, in every stage: each is one paragraph on stderr that names the
file, track, chromosome or chunk and says what to do, a non-zero exit status, no
traceback, and nothing changed outside the output folder (the tree is hashed before and
after). Rows of the failure table that belong to one stage are tested next to it
(test_ingest, test_train, test_impute, test_store, test_tracks); this module holds the
rows every stage shares: read-only outputs, object-store credentials, Ctrl-C, and names
read from files that become paths."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import pytest
import torch
from failcheck import changes, cli, paragraph, read_only, tree
from trainstore import make_store

from edice_dist import stages, storage
from edice_dist.checkpoint import save_model
from edice_dist.errors import InputError
from edice_dist.impute import impute
from edice_dist.model import EDICE, ModelConfig

CELLS = ["C00", "C01", "C02"]
ASSAYS = ["A0", "A1", "A2"]
TINY_TRAIN = ["--embed_dim=16", "--n_heads=2", "--ffn_dim=16", "--decoder_hidden=32",
              "--batch_size=64", "--val_bins=200", "--workers=1", "--cpus_per_worker=1",
              "--epochs=1", "--bins_per_epoch=256"]


def tiny_model(path, cells=CELLS, assays=ASSAYS, trained=True) -> str:
    """A small untrained model saved as ``edice train`` saves one."""
    torch.manual_seed(0)
    m = EDICE(ModelConfig(n_cells=len(cells), n_assays=len(assays), embed_dim=16,
                          decoder_hidden=32))
    info = {"cell_keys": list(cells), "assays": list(assays), "transform": "arcsinh"}
    if trained:
        info |= {"trained_cell_keys": list(cells), "trained_assays": list(assays)}
    save_model(str(path), m, info)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A finished store (3 cells x 3 assays, one pair missing), a model and a finished
    imputation run (not exported)."""
    d = tmp_path_factory.mktemp("failures")
    make_store(str(d / "store"), n_cells=3, n_assays=3, chrom_bins=(300, 130),
               chunk_bins=64, missing=((0, 0),))
    tiny_model(d / "model")
    impute(str(d / "store"), str(d / "model"), str(d / "run"), workers=1, export=False,
           dtype="float32")
    return d


# ---------------------------------------------------------------- read-only outputs

def _stage_args(stage: str, world, ro) -> list:
    (ro.parent / "src.bw").write_bytes(b"not read: the first write fails before")
    (ro.parent / "m.tsv").write_text("cell_type\tassay\tpath\nC\tA\tsrc.bw\n")
    (ro.parent / "chrom.sizes").write_text("chr1\t20000\n")
    return {
        "simulate": ["simulate", ro / "sim", "--chrom_sizes=c1:50009", "--n_cell_types=4",
                     "--n_test=2"],
        "ingest": ["ingest", ro.parent / "m.tsv", "--chrom-sizes", ro.parent / "chrom.sizes",
                   "--out", ro / "store"],
        "train": ["train", "--store", world / "store", "--out", ro / "model", *TINY_TRAIN],
        "impute": ["impute", "--store", world / "store", "--model", world / "model", "--out",
                   ro / "run", "--workers", "1", "--no-export"],
        "export": ["export", ro / "run"],
    }[stage]


@pytest.mark.parametrize("stage", ["simulate", "ingest", "train", "impute", "export"])
def test_read_only_output_is_one_paragraph(stage, world, tmp_path, capsys, monkeypatch):
    """Row: ``--out`` on a read-only file system (simulate, ingest, train, impute, export)
    gave an ``OSError`` traceback. Now: the paragraph names the path that could not be
    written and says what to do; the full trace is in the log file it names. The file
    system is made read-only by :func:`failcheck.read_only` (see there why)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if stage == "export":
        shutil.copytree(world / "run", ro / "run")
    args = _stage_args(stage, world, ro)
    before = tree(tmp_path)
    read_only(monkeypatch, ro)
    rc, err = cli(args, capsys)
    monkeypatch.undo()
    line = paragraph(err, f"edice {stage}")
    assert rc == 1
    assert re.search(rf"Cannot use {re.escape(str(ro))}\S*: the file system is read-only "
                     r"\(EROFS\)\. Choose a location on a writable file system\.", line), line
    log = re.search(r"Full trace in (\S+)\.\)$", line).group(1)
    assert "OSError" in open(log).read()
    assert changes(before, tree(tmp_path)) == []


# ---------------------------------------------------------------- object stores

def test_object_store_without_credentials(tmp_path, capsys, monkeypatch):
    """Row: an ``s3://`` path with no credentials gave a ~64-line ``NoCredentialsError``
    traceback. Now: one paragraph naming the URLs and where credentials come from."""
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-profile lookup
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached
    s3fs.S3FileSystem.clear_instance_cache()
    before = tree(tmp_path)
    rc, err = cli(["ingest", "s3://edice-test/m.tsv", "--chrom-sizes", "s3://edice-test/c.sizes",
                   "--out", "s3://edice-test/store"], capsys)
    line = paragraph(err, "edice ingest")
    assert rc == 1
    assert "s3://edice-test/m.tsv (manifest)" in line and "s3://edice-test/store (--out)" in line
    assert "no S3 credentials were found" in line and "AWS_ACCESS_KEY_ID" in line
    assert len(err.splitlines()) <= 3  # the stage's first log line, then the paragraph
    assert changes(before, tree(tmp_path)) == []


# ---------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_ctrl_c_is_the_same_in_every_stage(stage, tmp_path, capsys, monkeypatch):
    """Every stage interrupted is ``interrupted; re-run the same command to resume.`` with
    status 130. (The stage's work is replaced by an interruption here; test_train
    interrupts a real training run, where Ray Train used to take Ctrl-C over.)"""
    def interrupted(paths, options):
        raise KeyboardInterrupt

    st = stages.STAGES[stage]
    monkeypatch.setitem(stages.STAGES, stage, dataclasses.replace(st, run=interrupted))
    args = st.command.split()  # `edice personal leave-one-out` for a grouped stage
    for p in st.paths:
        args += ([p.flag] if p.flag.startswith("--") else []) + [tmp_path / p.name]
    rc, err = cli(args, capsys)
    assert rc == 130
    assert err.strip().splitlines()[-1] == \
        f"edice {st.command}: interrupted; re-run the same command to resume."


# ---------------------------------------------------------------- names that become paths

def test_model_names_that_would_escape_the_run_folder_are_refused(world, tmp_path, capsys):
    """Row: a model whose cell names (``model.pt`` metadata) contain ``../`` made impute
    write bigWigs outside the run folder (exit 0); a deeper one crashed pyBigWig. Now the
    names of every file read are checked by one rule, and nothing is written."""
    for name in ("../C00", "../../far/away/C00", ".hidden"):
        evil = tiny_model(tmp_path / "evil", cells=["C00", name, "C02"])
        before = tree(tmp_path)
        rc, err = cli(["impute", "--store", world / "store", "--model", evil, "--out",
                       tmp_path / "run"], capsys)
        line = paragraph(err, "edice impute")
        assert rc == 1 and f"cell type {name!r}" in line and "model.pt" in line
        assert "rename it" in line
        assert changes(before, tree(tmp_path)) == []


def test_store_and_run_names_are_checked_when_read(world, tmp_path, capsys):
    """The same rule for names read from a store's attributes and from an imputation's
    output store (which export turns into bigWig names)."""
    store = tmp_path / "store"
    shutil.copytree(world / "store", store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["tracks"][0]["assay"] = "../A1"
    (store / "zarr.json").write_text(json.dumps(meta))
    before = tree(tmp_path)
    rc, err = cli(["impute", "--store", store, "--model", world / "model", "--out",
                   tmp_path / "run"], capsys)
    line = paragraph(err, "edice impute")
    assert rc == 1 and f"Store {store}" in line and "assay '../A1'" in line
    assert changes(before, tree(tmp_path)) == []

    run = tmp_path / "run2"
    shutil.copytree(world / "run", run)
    meta = json.loads((run / "imputed.zarr" / "zarr.json").read_text())
    meta["attributes"]["targets"][0]["track_id"] = "../../../outside"
    (run / "imputed.zarr" / "zarr.json").write_text(json.dumps(meta))
    before = tree(tmp_path)
    rc, err = cli(["export", run], capsys)
    line = paragraph(err, "edice export")
    assert rc == 1 and "imputed.zarr" in line and "inconsistent" in line
    assert changes(before, tree(tmp_path)) == []


def test_every_output_path_stays_inside_its_folder(tmp_path):
    root = str(tmp_path / "out")
    assert storage.child(root, "bigwig", "A-B.bigWig") == os.path.join(root, "bigwig", "A-B.bigWig")
    for bad in (["..", "x"], ["../x"], ["a/../../x"], [""], ["."], ["/etc/passwd"]):
        with pytest.raises(InputError, match="outside the output folder"):
            storage.child(root, *bad, what="a track id")
    assert storage.child("s3://b/run", "x.bigWig") == "s3://b/run/x.bigWig"
    with pytest.raises(InputError, match="outside"):
        storage.child("s3://b/run", "../x.bigWig")


def test_ambiguous_names_in_a_model_are_refused(world, tmp_path, capsys):
    """Row: cell or assay names containing ``-`` let two pairs map to one bigWig name.
    ``<cell_type>-<assay>.bigWig`` stays the name (SPEC 3); a vocabulary in which two
    pairs would share one is refused, naming both."""
    model = tiny_model(tmp_path / "m", cells=["C00", "C01", "C01-A1"],
                       assays=["A0", "A1", "A1-A0"])
    before = tree(tmp_path)
    rc, err = cli(["impute", "--store", world / "store", "--model", model, "--out",
                   tmp_path / "run"], capsys)
    line = paragraph(err, "edice impute")
    assert rc == 1
    assert "C01 x A1-A0 and C01-A1 x A0 would both be named C01-A1-A0" in line
    assert changes(before, tree(tmp_path)) == []


def test_a_model_folder_is_an_input_once_training_finished(world, tmp_path, capsys):
    """Models are accepted as inputs only when finalised: ``model.pt`` is written last
    (atomically); a folder whose training has not finished says so. (Unfinished stores:
    test_ingest; unfinished runs: test_export.)"""
    model = tmp_path / "model"
    model.mkdir()
    (model / "train.json").write_text(json.dumps({"kind": "train", "status": "running"}))
    before = tree(tmp_path)
    rc, err = cli(["impute", "--store", world / "store", "--model", model, "--out",
                   tmp_path / "run"], capsys)
    line = paragraph(err, "edice impute")
    assert rc == 1 and f"The training in {model} has not finished" in line
    assert changes(before, tree(tmp_path)) == []
