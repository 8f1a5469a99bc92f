"""The side-by-side harness for the authors' eDICE (benchmarks/reference.py).

The export and the scoring need no TensorFlow and run everywhere, in seconds. The run of
the reference itself is skipped unless ``EDICE_REFERENCE`` (a checkout of alex-hh/eDICE)
and ``EDICE_REFERENCE_PYTHON`` (an interpreter with tensorflow-cpu 2.15) are set.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pyBigWig
import pytest
import zarr

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trainstore import make_store  # noqa: E402

from benchmarks import reference as ref  # noqa: E402
from edice_dist import storage  # noqa: E402
from edice_dist.genome import Genome  # noqa: E402
from edice_dist.train import plan_tracks  # noqa: E402
from edice_dist.trainconfig import load_config  # noqa: E402

CELLS = ["C00", "C01", "C02", "C03", "C04", "C05"]
ASSAYS = ["A0", "A1", "A2", "A3"]


def _small(tmp_path, val: bool = True):
    """A float16 store (as ingest writes) with a gap in the grid, a test track (and a val
    track), and chunks that straddle a chromosome end."""
    path = str(tmp_path / "store")
    splits = {(3, 3): "test", **({(0, 1): "val"} if val else {})}
    st, _ = make_store(path, n_cells=6, n_assays=4, chrom_bins=(1300, 700), chunk_bins=512,
                       missing=((1, 2), (4, 0)), splits=splits, dtype="float16")
    return st


@pytest.fixture
def small(tmp_path):
    return _small(tmp_path)


def _independent(path: str) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """Every column of the store read straight with zarr (not through edice_dist.store),
    chromosomes in the order of the root attributes; and each column's split, cell, assay."""
    root = zarr.open_group(storage.zarr_store(path, read_only=True), mode="r")
    attrs = dict(root.attrs)
    data = np.concatenate([np.asarray(root["signal"][c["array"]][:], dtype=np.float32)
                           for c in attrs["chroms"]])
    tr = attrs["tracks"]
    return data, [t["split"] for t in tr], [t["cell_key"] for t in tr], [t["assay"] for t in tr]


@pytest.mark.parametrize("tracks,val", [("train", True), ("plan", True), ("plan", False)])
def test_export_equals_an_independent_read(tmp_path, tracks, val):
    small = _small(tmp_path, val)
    targets = [("C00", "A1"), "C03:A3", ("C01", "A2")]  # val, test and unobserved pairs
    exp = ref.export_tracks(small.path, targets, str(tmp_path / "work"),
                            {"tracks": tracks, "seed": 3, "n_targets": 50})
    z = np.load(exp["path"])
    data, splits, cells, assays = _independent(small.path)
    train = [i for i, s in enumerate(splits) if s == "train"]
    if tracks == "train":
        cols = train
        assert int(z["n_targets"]) == len(cols) - 1  # capped: one support kept
    else:
        plan = plan_tracks(small, load_config(overrides={"seed": "3", "n_targets": "50"}))
        cols = plan.inputs
        # With a val split our training uses every train track; without, it holds out one
        # track of every assay with at least 3 training tracks (5 % rounds to 1), and so
        # must the export.
        per_assay = {a: sum(1 for i in train if assays[i] == a) for a in set(assays)}
        held = 0 if val else sum(1 for n in per_assay.values() if n >= 3)
        assert len(cols) == len(train) - held and set(cols) <= set(train)
        kept = {a: sum(1 for i in cols if assays[i] == a) for a in per_assay}
        assert all(kept[a] == n - (0 if val or n < 3 else 1) for a, n in per_assay.items())
        assert int(z["n_targets"]) == plan.n_targets
    assert z["columns"].tolist() == cols == exp["columns"]
    assert z["x"].dtype == np.float32 and z["x"].shape == (2000, len(cols))
    np.testing.assert_array_equal(z["x"], data[:, cols])
    vcells, vassays = sorted(set(cells)), sorted(set(assays))
    assert int(z["n_cells"]) == len(vcells) == 6 and int(z["n_assays"]) == len(vassays) == 4
    assert [vcells[i] for i in z["cell_ids"]] == [cells[c] for c in cols]
    assert [vassays[i] for i in z["assay_ids"]] == [assays[c] for c in cols]
    assert [vcells[i] for i in z["target_cell_ids"]] == ["C00", "C03", "C01"]
    assert [vassays[i] for i in z["target_assay_ids"]] == ["A1", "A3", "A2"]


def test_export_refuses_targets_outside_the_vocabulary(small, tmp_path):
    with pytest.raises(ValueError, match="C09:A0"):
        ref.export_tracks(small.path, ["C09:A0"], str(tmp_path / "w"))


def test_avg_and_scores(small, tmp_path):
    data, splits, cells, assays = _independent(small.path)
    avg = ref.avg_predictions(small, [("C00", "A1")])
    cols = [i for i, s in enumerate(splits) if s == "train" and assays[i] == "A1"
            and cells[i] != "C00"]
    assert len(cols) == 5
    np.testing.assert_allclose(avg[0], data[:, cols].mean(axis=1), rtol=1e-6)
    t = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 2.0]])
    p = np.array([[-1.0, 1.0, 2.0, 3.0], [2.0, 2.0, 4.0, 4.0]])
    s = ref.score_tracks(p, t)  # the -1 is clipped to 0: first track exact
    assert s["per_track"]["mse"] == [0.0, 2.5]
    np.testing.assert_allclose(s["per_track"]["gwcorr"], [1.0, 1.0])
    assert s["mse"] == 1.25


def test_truth_bins_are_arcsinh_of_25bp_means(tmp_path):
    genome = Genome(("chr1", "chr2"), (110, 50))  # chr1 ends in a 10 bp bin
    path = str(tmp_path / "t.bigWig")
    bw = pyBigWig.open(path, "w")
    bw.addHeader([("chr1", 110), ("chr2", 50)])
    bw.addEntries(["chr1", "chr1"], [0, 30], ends=[20, 105], values=[2.0, 4.0])
    bw.close()
    got = ref.read_truth_bins(path, genome)
    want = np.arcsinh([40 / 25, 80 / 25, 100 / 25, 100 / 25, 20 / 10, 0, 0])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_tree_cpu_counts_a_busy_child():
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c",
                             "import time\nt=time.process_time()\n"
                             "while time.process_time()-t<0.5: pass"])
    s = ref.TreeCPU(os.getpid(), every=0.05)
    s.start()
    proc.wait()
    total = s.stop()
    assert total >= 0.4 and s.cpu_between(s.samples[0][0], s.samples[-1][0]) >= 0.3


REF = os.environ.get("EDICE_REFERENCE")
REF_PY = os.environ.get("EDICE_REFERENCE_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not (REF and REF_PY), reason="set EDICE_REFERENCE and "
                    "EDICE_REFERENCE_PYTHON to run the authors' TensorFlow code")
def test_reference_trains_and_predicts(small, tmp_path):
    settings = {"embed_dim": 8, "decoder_hidden": 16, "n_targets": 5, "epochs": 1,
                "bins_per_epoch": 512, "seed": 1, "threads": 1, "predict_batch": 300}
    res = ref.run_reference(REF, REF_PY, small.path, ["C00:A1", "C01:A2"], settings,
                            str(tmp_path / "work"))
    assert res["predictions"].shape == (2, 2000)
    assert np.isfinite(res["predictions"]).all()
    tm = res["timings"]
    assert tm["epochs"][0]["bins"] == 512 and tm["steps_per_epoch"] == 2
    assert tm["cpu_s"] > 0 and tm["startup_to_first_step_s"] > 0
    assert tm["predict"]["target_bins"] == 4000
