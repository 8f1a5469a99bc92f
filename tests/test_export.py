"""The reducer: output store -> bigWigs, checked by reading them back with pyBigWig."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyBigWig
import pytest
import zarr

from edice_dist import owned
from edice_dist.errors import EdiceError, InputError
from edice_dist.export import export, write_bigwig

CHUNK = 32
# chrM: one partial bin only; chrX: ends on a bin edge; chr10: several chunks, partial end.
CHROMS = [("chr10", 100 * 25 - 3), ("chrX", 40 * 25), ("chrM", 16)]
TARGETS = [
    {"cell_key": "liver", "assay": "H3K4me3", "cell_type": "liver", "individual": "",
     "track_id": "liver-H3K4me3"},
    {"cell_key": "lung@ind2", "assay": "DNase", "cell_type": "lung", "individual": "ind2",
     "track_id": "lung@ind2-DNase"},
    {"cell_key": "gut", "assay": "H3K27ac", "cell_type": "gut", "individual": "",
     "track_id": "gut-H3K27ac"},
]


def make_run(run_dir, seed=0, nan_at=None):
    """A run folder with a hand-written output store; returns {chrom: (K, n_bins) values}."""
    owned.claim(run_dir, "run")  # as edice impute does, before it writes
    rng = np.random.default_rng(seed)
    root = zarr.open_group(os.path.join(run_dir, "imputed.zarr"), mode="w", zarr_format=3)
    meta, data = [], {}
    for name, size in CHROMS:
        nb = -(-size // 25)
        cb = min(CHUNK, nb)
        arr = root.create_array(name, shape=(len(TARGETS), nb), chunks=(1, cb),
                                shards=(len(TARGETS), cb), dtype="float32")
        vals = rng.normal(0.5, 1.0, (len(TARGETS), nb)).astype(np.float32)
        if nan_at and nan_at[0] == name:
            vals[nan_at[1], nan_at[2]] = np.nan
        arr[:] = vals
        data[name] = vals
        meta.append({"name": name, "size": size, "n_bins": nb, "array": name})
    root.attrs.update({"format": "edice-imputation", "targets": TARGETS, "bin_size": 25,
                       "chunk_bins": CHUNK, "chroms": meta, "transform": "arcsinh",
                       "completed": "2026-01-01T00:00:00+00:00"})  # as impute ends it
    return data


def check_bigwig(path, data, k, space):
    bw = pyBigWig.open(path)
    assert list(bw.chroms().items()) == CHROMS  # chrom.sizes order, not sorted
    for name, size in CHROMS:
        iv = np.array(bw.intervals(name))
        nb = data[name].shape[1]
        assert len(iv) == nb
        np.testing.assert_array_equal(iv[:, 0], np.arange(nb) * 25)
        np.testing.assert_array_equal(iv[:, 1], np.minimum(np.arange(1, nb + 1) * 25, size))
        v = data[name][k].astype(np.float64)
        want = np.maximum(np.sinh(v), 0.0) if space == "pval" else v
        np.testing.assert_allclose(iv[:, 2], want, rtol=1e-6, atol=1e-7)
        # Base-level reads agree too (the bigWig index covers the last, short bin).
        base = bw.values(name, 0, size, numpy=True)
        np.testing.assert_allclose(base, np.repeat(want, 25)[:size], rtol=1e-6, atol=1e-7)
    bw.close()


@pytest.mark.parametrize("space", ["pval", "arcsinh"])
def test_write_bigwig_values_and_layout(tmp_path, space):
    data = make_run(str(tmp_path))
    dest = str(tmp_path / "out" / "x.bigWig")
    n = write_bigwig(str(tmp_path / "imputed.zarr"), 1, dest, space)
    assert n == sum(d.shape[1] for d in data.values())
    check_bigwig(dest, data, 1, space)
    assert os.listdir(tmp_path / "out") == ["x.bigWig"]  # no temporary file left
    if space == "pval":
        assert min(v.min() for v in data.values()) < 0  # the clipping was exercised


def test_non_finite_value_is_refused(tmp_path):
    make_run(str(tmp_path), nan_at=("chrX", 2, 33))
    dest = str(tmp_path / "out" / "gut.bigWig")
    with pytest.raises(EdiceError, match=r"gut-H3K27ac .*chrX \(first at bin 33, 825 bp\)"):
        write_bigwig(str(tmp_path / "imputed.zarr"), 2, dest)
    assert os.listdir(tmp_path / "out") == []  # neither the file nor its temporary


def test_export_run_folder(tmp_path, ray_local):
    run = str(tmp_path / "run")
    data = make_run(run, seed=3)
    s = export(run)
    assert s["files"] == 3 and s["bins"] == 141 and s["bins_per_s"] > 0
    bw_dir = os.path.join(run, "bigwig")
    rows = [r.split("\t") for r in open(os.path.join(bw_dir, "manifest.tsv")).read().splitlines()]
    assert rows == [["cell_type", "assay", "individual", "path"],
                    ["liver", "H3K4me3", "", "liver-H3K4me3.bigWig"],
                    ["lung", "DNase", "ind2", "lung@ind2-DNase.bigWig"],
                    ["gut", "H3K27ac", "", "gut-H3K27ac.bigWig"]]
    for k, t in enumerate(TARGETS):
        check_bigwig(os.path.join(bw_dir, t["track_id"] + ".bigWig"), data, k, "pval")

    # Existing files are kept; a missing one is written again.
    os.remove(os.path.join(bw_dir, "gut-H3K27ac.bigWig"))
    s = export(run)
    assert s["files"] == 1 and s["skipped"] == 2
    check_bigwig(os.path.join(bw_dir, "gut-H3K27ac.bigWig"), data, 2, "pval")

    # Another value space needs --force, which rewrites every file.
    with pytest.raises(InputError, match="pval values; rewrite them as arcsinh with .*--force"):
        export(run, space="arcsinh")
    s = export(run, space="arcsinh", force=True)
    assert s["files"] == 3
    for k, t in enumerate(TARGETS):
        check_bigwig(os.path.join(bw_dir, t["track_id"] + ".bigWig"), data, k, "arcsinh")


def test_export_needs_a_finished_run(tmp_path):
    with pytest.raises(InputError, match="no imputation output"):
        export(str(tmp_path))
    os.makedirs(tmp_path / "imputed.zarr.partial")  # an earlier edice-dist's unfinished run
    with pytest.raises(EdiceError, match="not finished"):
        export(str(tmp_path))
    shutil.rmtree(tmp_path / "imputed.zarr.partial")
    make_run(str(tmp_path))  # written in place, but without its completion record
    meta = json.loads((tmp_path / "imputed.zarr" / "zarr.json").read_text())
    del meta["attributes"]["completed"]
    (tmp_path / "imputed.zarr" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(EdiceError, match=r"not finished \(imputed.zarr is not complete\)"):
        export(str(tmp_path))
    with pytest.raises(InputError, match="space"):
        export(str(tmp_path), space="log")
