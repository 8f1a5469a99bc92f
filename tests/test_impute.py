"""Genome-wide imputation by Ray actors: values, fault tolerance, resume, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pyBigWig
import pytest
import torch
import zarr
from failcheck import changes, cli, paragraph, tree

from edice_dist import _faults, runfolder
from edice_dist import store as S
from edice_dist._partial import done_set
from edice_dist.checkpoint import load_model, save_model
from edice_dist.errors import EdiceError, InputError
from edice_dist.genome import Genome
from edice_dist.impute import impute
from edice_dist.imputepool import pool_shape
from edice_dist.model import EDICE, ModelConfig
from edice_dist.runfolder import describe as describe_run
from edice_dist.tracks import Track

CHUNK = 64
CELLS = ["A", "B", "C", "D"]
ASSAYS = ["DNase", "H3K27ac", "H3K4me3"]
# chr1: 5 chunks, the last bin 18 bp long; chr2: 3 chunks ending on a bin edge.
GENOME = Genome(("chr1", "chr2"), (300 * 25 - 7, 150 * 25))
TRACKS = [
    Track("A", "H3K4me3"), Track("A", "H3K27ac"), Track("B", "H3K4me3", split="val"),
    Track("C", "H3K27ac"), Track("C", "DNase", split="test"), Track("B", "DNase"),
    Track("E", "H3K4me3"),  # a cell the model does not know: never a support
]


def make_store(path, seed=0, transform=None):
    root = S.create(str(path), GENOME, TRACKS, chunk_bins=CHUNK, dtype="float32")
    if transform:
        root.attrs["transform"] = transform
    rng = np.random.default_rng(seed)
    for c in root.attrs["chroms"]:
        vals = np.arcsinh(rng.gamma(0.7, 2.0, (c["n_bins"], len(TRACKS))))
        root["signal"][c["array"]][:] = vals.astype(np.float32)
    S.mark_complete(str(path))
    return str(path)


def make_model(path, seed=0, cells=CELLS, assays=ASSAYS, transform="arcsinh"):
    torch.manual_seed(seed)
    m = EDICE(ModelConfig(n_cells=len(cells), n_assays=len(assays), embed_dim=16,
                          decoder_hidden=32))
    # Outputs near 0 on both sides, so that the clipping of negatives is exercised.
    with torch.no_grad():
        m.output.weight.mul_(4.0)
        m.output.bias.fill_(-0.7)
    save_model(str(path), m, {"cell_keys": cells, "assays": assays, "transform": transform})
    return str(path)


def direct_forward(model_dir, store_path, targets, chrom):
    """The model's own forward pass on a whole chromosome: (K, n_bins) arcsinh."""
    model, meta = load_model(model_dir)
    st = S.open_store(store_path)
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    cols = [i for i, t in enumerate(TRACKS) if t.split in ("train", "val") and t.cell_type in ci]
    x = torch.from_numpy(st.read(chrom, 0, GENOME.n_bins(chrom))[:, cols])
    with torch.no_grad():
        y = model(x, torch.ones(x.shape, dtype=torch.bool),
                  torch.tensor([ci[TRACKS[i].cell_type] for i in cols]),
                  torch.tensor([ai[TRACKS[i].assay] for i in cols]),
                  torch.tensor([ci[c] for c, _ in targets]), torch.tensor([ai[a] for _, a in targets]))
    return y.numpy().T


def read_output(run_dir):
    root = zarr.open_group(os.path.join(run_dir, "imputed.zarr"), mode="r")
    return {k: np.asarray(root[k][:]) for k in ("chr1", "chr2")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("impute")
    return {"dir": d, "store": make_store(d / "store"), "model": make_model(d / "model"),
            "model2": make_model(d / "model2", seed=5)}


@pytest.fixture(scope="module")
def clean_run(world, ray_local):
    """A clean bf16 run with 2 single-thread actors (the reference for the fault tests)."""
    run = str(world["dir"] / "clean")
    summary = impute(world["store"], world["model"], run, workers=2, export=False,
                     dtype="bfloat16")
    return run, summary


def test_bigwigs_equal_direct_forward(world, ray_local, tmp_path):
    run = str(tmp_path / "run")
    summary = impute(world["store"], world["model"], run, workers=1, dtype="float32")
    # Default targets: every vocabulary pair without a train/val track (test tracks count
    # as unobserved); cell E is outside the vocabulary.
    observed = {(t.cell_type, t.assay) for t in TRACKS if t.split != "test"}
    expected = [(c, a) for c in CELLS for a in ASSAYS if (c, a) not in observed]
    assert ("C", "DNase") in expected
    info = json.loads(open(os.path.join(run, "run.json")).read())
    assert [(t["cell_key"], t["assay"]) for t in info["targets"]] == expected
    assert summary["chunks_total"] == 8 and summary["chunks_computed"] == 8
    assert summary["tracks"] == len(expected) and summary["bins"] == 450
    assert read_output(run)["chr1"].dtype == np.float32  # float32 compute is stored exactly

    rows = open(os.path.join(run, "bigwig", "manifest.tsv")).read().splitlines()
    assert rows[0].split("\t") == ["cell_type", "assay", "individual", "path"]
    assert sorted(tuple(r.split("\t")[:2]) for r in rows[1:]) == sorted(expected)

    refs = {c: direct_forward(world["model"], world["store"], expected, c) for c in GENOME.chroms}
    for k, (cell, assay) in enumerate(expected):
        bw = pyBigWig.open(os.path.join(run, "bigwig", f"{cell}-{assay}.bigWig"))
        assert list(bw.chroms().items()) == list(zip(GENOME.chroms, GENOME.sizes, strict=True))
        for chrom, size in zip(GENOME.chroms, GENOME.sizes, strict=True):
            iv = np.array(bw.intervals(chrom))
            nb = GENOME.n_bins(chrom)
            assert len(iv) == nb and nb > 2 * CHUNK  # spans several chunks
            np.testing.assert_array_equal(iv[:, 0], np.arange(nb) * 25)
            np.testing.assert_array_equal(iv[:, 1], np.minimum(np.arange(1, nb + 1) * 25, size))
            want = np.maximum(np.sinh(refs[chrom][k]), 0)
            np.testing.assert_allclose(iv[:, 2], want, rtol=2e-5, atol=1e-6)
            # Bins either side of a chunk boundary, read through the bigWig index.
            v = bw.values(chrom, CHUNK * 25 - 25, CHUNK * 25 + 25, numpy=True)
            np.testing.assert_allclose(v[[0, 25]], want[[CHUNK - 1, CHUNK]], rtol=2e-5, atol=1e-6)
        bw.close()
    assert sum(np.any(refs[c] < 0) for c in refs)  # clipping was exercised

    # Re-running the same command computes and exports nothing.
    again = impute(world["store"], world["model"], run, workers=1, dtype="float32")
    assert again["chunks_computed"] == 0 and again["export"]["files"] == 0

    # Re-export in arcsinh space needs --force and then gives the model output itself.
    from edice_dist.export import export

    with pytest.raises(InputError, match="--force"):
        export(run, space="arcsinh")
    export(run, space="arcsinh", force=True)
    k = expected.index(("D", "H3K27ac"))
    bw = pyBigWig.open(os.path.join(run, "bigwig", "D-H3K27ac.bigWig"))
    got = np.array(bw.intervals("chr2"))[:, 2]
    np.testing.assert_allclose(got, refs["chr2"][k], rtol=2e-5, atol=1e-6)
    assert "8/8 done" in describe_run(run) and f"{len(expected)}/{len(expected)} written" in describe_run(run)


def test_killed_actor_gives_identical_output(world, clean_run, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    monkeypatch.setenv(_faults.ENV, json.dumps({"impute_exit_chunk": "chr1:3"}))
    summary = impute(world["store"], world["model"], run, workers=2, export=False,
                     dtype="bfloat16")
    marker = os.path.join(run, _faults.MARKER)
    assert open(marker).read() == "chr1\t3\n"  # the actor did die on that chunk
    assert summary["actor_failures"] == 1
    ref, got = read_output(clean_run[0]), read_output(run)
    assert ref["chr1"].dtype == np.float16  # bf16 compute is stored as float16
    for chrom in ref:
        assert np.isfinite(got[chrom]).all()
        np.testing.assert_array_equal(got[chrom], ref[chrom])


def test_rerun_computes_only_missing_chunks(world, clean_run, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    monkeypatch.setenv(_faults.ENV, json.dumps({"impute_stop_after": 3}))
    with pytest.raises(EdiceError, match="stopped"):
        impute(world["store"], world["model"], run, workers=2, export=False,
               dtype="bfloat16")
    part = os.path.join(run, "imputed.zarr")  # written in place, complete only when recorded
    done = done_set(part)
    assert 3 <= len(done) < 8
    assert not runfolder.is_complete(part)
    with pytest.raises(EdiceError, match="not finished"):
        runfolder.finished_output(run)
    assert f"{len(done)}/8 done" in describe_run(run)

    log = str(tmp_path / "computed.tsv")
    monkeypatch.setenv(_faults.ENV, json.dumps({"impute_log": log}))
    summary = impute(world["store"], world["model"], run, workers=2, export=False,
                     dtype="bfloat16")
    computed = {(c, int(i)) for c, i in (ln.split("\t") for ln in open(log).read().splitlines())}
    every = {(c.chrom, c.index) for c in GENOME.chunks(CHUNK)}
    assert computed == every - done
    assert summary["chunks_computed"] == 8 - len(done)
    assert summary["chunks_skipped"] == len(done)
    ref, got = read_output(clean_run[0]), read_output(run)
    for chrom in ref:
        np.testing.assert_array_equal(got[chrom], ref[chrom])


def test_changed_settings_are_refused_unless_force(world, ray_local, tmp_path):
    run = str(tmp_path / "run")
    impute(world["store"], world["model"], run, targets="D:DNase,A:H3K4me3", chroms=["chr2"],
           export=False, workers=1)
    with pytest.raises(InputError, match=r"model .*--force"):
        impute(world["store"], world["model2"], run, targets="D:DNase,A:H3K4me3",
               chroms=["chr2"], export=False)
    with pytest.raises(InputError, match=r"targets \(2 before, 1 now; 0 added, 1 removed\)"):
        impute(world["store"], world["model"], run, targets="D:DNase", chroms=["chr2"],
               export=False)
    s = impute(world["store"], world["model2"], run, targets="D:DNase", chroms=["chr2"],
               export=False, force=True, workers=1)
    assert s["chunks_computed"] == 3
    info = json.loads(open(os.path.join(run, "run.json")).read())
    assert info["model"] == world["model2"] and len(info["targets"]) == 1
    assert "completed" in info
    # An observed pair may be a target (quality control).
    assert read_output_shape(run) == (1, 150)


def read_output_shape(run):
    return zarr.open_group(os.path.join(run, "imputed.zarr"), mode="r")["chr2"].shape


def test_bad_inputs(world, tmp_path):
    with pytest.raises(InputError, match=r"cell type 'Dd'.*did you mean D"):
        impute(world["store"], world["model"], str(tmp_path / "r1"), targets="Dd:DNase")
    with pytest.raises(InputError, match=r"assay 'H3K4me2'.*did you mean H3K4me3"):
        impute(world["store"], world["model"], str(tmp_path / "r1"), targets="D:H3K4me2")
    other = make_model(tmp_path / "m_none", transform="none")
    with pytest.raises(InputError, match="transformed by 'arcsinh'.*'none'"):
        impute(world["store"], other, str(tmp_path / "r2"))
    alien = make_model(tmp_path / "m_alien", cells=["X", "Y"], assays=["DNase"])
    with pytest.raises(InputError, match="No train/val track"):
        impute(world["store"], alien, str(tmp_path / "r3"))
    with pytest.raises(InputError, match="chr9"):
        impute(world["store"], world["model"], str(tmp_path / "r4"), chroms=["chr9"])
    with pytest.raises(InputError, match="No track store"):
        impute(str(tmp_path / "nowhere"), world["model"], str(tmp_path / "r5"))
    assert not os.path.exists(tmp_path / "r1")  # nothing is written before inputs check out


def test_pool_shape():
    # CPU box: single-thread actors on every CPU, or the workers asked for, sharing the CPUs.
    assert pool_shape(2, 0) == (2, {"num_gpus": 0, "num_cpus": 1}, 1)
    assert pool_shape(2, 0, workers=1) == (1, {"num_gpus": 0, "num_cpus": 2}, 2)
    assert pool_shape(64, 0, workers=4, node_cpus=8) == (4, {"num_gpus": 0, "num_cpus": 8}, 8)
    assert pool_shape(2, 0, workers=5) == (2, {"num_gpus": 0, "num_cpus": 1}, 1)
    # GPUs: one actor per GPU holding one CPU; gpus=0 forces CPU actors.
    assert pool_shape(16, 4) == (4, {"num_gpus": 1, "num_cpus": 1}, 4)
    assert pool_shape(16, 4, gpus=2) == (2, {"num_gpus": 1, "num_cpus": 1}, 4)
    assert pool_shape(16, 4, gpus=0)[1]["num_gpus"] == 0
    # An autoscaling cluster may start with no GPU node: GPUs are asked for, not refused.
    assert pool_shape(8, 0, gpus=2, autoscaling=True) == (2, {"num_gpus": 1, "num_cpus": 1}, 4)
    with pytest.raises(InputError, match="more GPUs"):
        pool_shape(16, 1, gpus=2)


# -- the failure table (issue 10): messages, exit status, nothing changed outside --------

def _run_cli(world, out, capsys, *extra):
    return cli(["impute", "--store", world["store"], "--model", world["model"], "--out", out,
                "--workers", "1", *extra], capsys)


def test_foreign_bigwigs_in_the_run_folder_are_never_taken_or_replaced(world, tmp_path, capsys):
    """Row: ``--out DIR`` where ``DIR/bigwig/`` holds unrelated bigWigs with matching names
    was reported as already exported (and with --force overwritten). A folder without
    edice's marker is refused, with or without --force."""
    out = tmp_path / "run"
    (out / "bigwig").mkdir(parents=True)
    (out / "bigwig" / "D-DNase.bigWig").write_bytes(b"someone else's bigWig")
    before = tree(tmp_path)
    for extra in ((), ("--force",)):
        rc, err = _run_cli(world, out, capsys, *extra)
        line = paragraph(err, "edice impute")
        assert rc == 1 and f"--out {out} is not an imputation run folder" in line
        assert "bigwig" in line and "not even with --force" in line
        assert changes(before, tree(tmp_path)) == []


def test_missing_corrupt_and_unwritable_chunks_name_the_chunk(world, tmp_path, capsys,
                                                               monkeypatch):
    """Rows: one chunk file deleted from a finished store (read as zeros, exit 0); a
    corrupt store chunk or a full disk during impute (three actor failures, then a remote
    stack trace naming the wrong chunk and no file). Now: at the first failure, one
    paragraph naming the chunk, its bins and the file."""
    store = tmp_path / "store"
    import shutil

    shutil.copytree(world["store"], store)
    chunk = store / "signal" / "chr1" / "c" / "2" / "0"
    os.remove(chunk)
    rc, err = cli(["impute", "--store", store, "--model", world["model"], "--out",
                   tmp_path / "r1", "--workers", "1", "--no-export"], capsys)
    line = paragraph(err, "edice impute")
    assert rc == 1 and "chr1 bins 128-192 (chunk 2)" in line
    assert f"The chunk file {chunk} is missing" in line
    assert "failed 3 times" not in err and "replacing it" not in err  # no retries

    shutil.copyfile(os.path.join(world["store"], "signal", "chr1", "c", "2", "0"), chunk)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    chunk.write_bytes(bytes(raw))
    rc, err = cli(["impute", "--store", store, "--model", world["model"], "--out",
                   tmp_path / "r2", "--workers", "1", "--no-export"], capsys)
    line = paragraph(err, "edice impute")
    assert rc == 1 and "chr1 bins 128-192 (chunk 2)" in line and str(chunk) in line
    assert "checksum" in line and "replacing it" not in err

    monkeypatch.setenv(_faults.ENV, json.dumps({"impute_enospc_chunk": "chr2:1"}))
    before = tree(tmp_path, skip=("r3",))
    rc, err = _run_cli(world, tmp_path / "r3", capsys, "--no-export")
    line = paragraph(err, "edice impute")
    part = tmp_path / "r3" / "imputed.zarr"
    assert rc == 1 and f"chr2 bins 64-128 (chunk 1) failed while writing {part}" in line
    assert "no space is left on the device (ENOSPC)" in line and "replacing it" not in err
    assert changes(before, tree(tmp_path, skip=("r3",))) == []


def test_bad_settings_fail_before_any_work(world, tmp_path, capsys):
    """Row: ``--batch-bins 0`` during impute (actor failures, then run.json and a
    .partial left behind). Settings are checked before anything is written; a targets
    TSV with a short row (an AttributeError traceback) names its file and line."""
    before = tree(tmp_path)
    rc, err = _run_cli(world, tmp_path / "run", capsys, "--batch-bins", "0")
    assert rc == 1 and "--batch-bins must be an integer >= 1" in paragraph(err, "edice impute")
    with pytest.raises(InputError, match="--batch-bins"):
        impute(world["store"], world["model"], str(tmp_path / "run"), batch_bins=0)
    assert changes(before, tree(tmp_path)) == []

    targets = tmp_path / "targets.tsv"
    targets.write_text("cell_type\tassay\nD\tDNase\nA\n")
    before = tree(tmp_path)
    rc, err = _run_cli(world, tmp_path / "run", capsys, "--targets", targets)
    line = paragraph(err, "edice impute")
    assert rc == 1 and f"Targets file {targets}, line 3: 'A' lacks an assay" in line
    assert changes(before, tree(tmp_path)) == []


def test_untrained_vocabulary_is_refused_or_skipped(world, tmp_path, capsys):
    """Row: a cell or assay of the vocabulary with no training track was imputed silently
    from an untrained (random) embedding. Named targets are refused, saying how to fix
    it; default targets leave them out with a warning."""
    m = EDICE(ModelConfig(n_cells=4, n_assays=3, embed_dim=16, decoder_hidden=32))
    model = str(tmp_path / "model")
    save_model(model, m, {"cell_keys": CELLS, "assays": ASSAYS, "transform": "arcsinh",
                          "trained_cell_keys": ["A", "B", "C"], "trained_assays": ASSAYS})
    before = tree(tmp_path)
    rc, err = cli(["impute", "--store", world["store"], "--model", model, "--out",
                   tmp_path / "run", "--targets", "D:DNase,A:DNase"], capsys)
    line = paragraph(err, "edice impute")
    assert rc == 1 and "cell type(s) D never trained; target(s) D:DNase" in line
    assert "train-split tracks" in line
    assert changes(before, tree(tmp_path)) == []

    s = impute(world["store"], model, str(tmp_path / "run"), chroms=["chr2"], export=False,
               workers=1)
    info = json.loads(open(os.path.join(tmp_path, "run", "run.json")).read())
    assert all(t["cell_key"] != "D" for t in info["targets"]) and s["tracks"] == len(info["targets"])
    assert "warning: not imputing 3 pair(s)" in capsys.readouterr().err


def test_actors_choose_their_own_dtype_and_threads(world, ray_local, tmp_path, monkeypatch):
    """The compute dtype and thread count are decided in each actor from its own device,
    not from the driver's /proc/cpuinfo: this driver is told that its CPU is the opposite
    of what it is; the actors (other processes, as on other nodes) see the real CPU and
    choose by it. The output store's dtype is fixed before they start: float16."""
    from edice_dist import predict

    real = predict.cpu_has_fast_bf16()
    monkeypatch.setattr(predict, "cpu_has_fast_bf16", lambda: not real)
    monkeypatch.delenv("EDICE_PREDICT_DTYPE", raising=False)
    run = str(tmp_path / "run")
    s = impute(world["store"], world["model"], run, workers=1, export=False)
    own = "bfloat16" if real else "float32"
    assert [a["dtype"] for a in s["actors"]] == [own]
    assert [a["threads"] for a in s["actors"]] == [2]  # one actor on 2 CPUs: both reserved
    info = json.loads(open(os.path.join(run, "run.json")).read())
    assert info["dtype"] == "auto" and [a["dtype"] for a in info["actors"]] == [own]
    assert read_output(run)["chr1"].dtype == np.float16


def test_an_actor_given_a_gpu_that_torch_cannot_see(monkeypatch):
    """A GPU that Ray assigned but torch cannot use (a CPU build of torch on a GPU node) is
    an error naming the fix, not a silent 100x slower run on the CPU; the tests' fake GPUs
    (fault ``fake_gpus``) compute on the CPU."""
    import ray

    from edice_dist.imputepool import WorkerSpec, actor_device

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type(
        "Ctx", (), {"get_node_id": lambda self: "ab" * 28})())
    spec = WorkerSpec("m", "s", "o", "r", *([np.zeros(1, dtype=np.int64)] * 5), {})
    with pytest.raises(EdiceError, match="sees no CUDA device.*CUDA build of torch"):
        actor_device(spec)
    spec.faults = {"fake_gpus": True}
    assert actor_device(spec).type == "cpu"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert actor_device(WorkerSpec("m", "s", "o", "r", *([np.zeros(1)] * 5), {})).type == "cpu"
