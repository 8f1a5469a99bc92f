"""The Zarr track store: layout, windows across chunks, errors and `describe`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from edice_dist import store as store_mod
from edice_dist.cli import main
from edice_dist.errors import EdiceError, InputError
from edice_dist.genome import Genome
from edice_dist.store import array_key, create, describe, open_store, presence_matrix
from edice_dist.tracks import Track

GENOME = Genome(("chr1", "chrUn_KI270302v1", "HLA-A*01:01"), (2_513, 1_000, 260))
TRACKS = [
    Track("liver", "H3K4me3", "/d/a.bw", "train"),
    Track("liver", "DNase", "/d/b.bw", "val"),
    Track("brain", "H3K4me3", "/d/c.bw", "test"),
    Track("brain", "H3K27ac", "/d/d.bw", "train", individual="p1"),
]


def _filled(path, dtype="float16", chunk_bins=30, seed=0):
    """A store whose chunks hold arcsinh of seeded values; returns (store path, data)."""
    create(str(path), GENOME, TRACKS, chunk_bins=chunk_bins, dtype=dtype)
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="r+")
    data = {}
    for i, (c, nb) in enumerate(zip(GENOME.chroms, [101, 40, 11], strict=True)):
        x = np.arcsinh(rng.gamma(1.0, 2.0, (nb, len(TRACKS))))
        root["signal"][array_key(c, i)][:] = x.astype(dtype)
        data[c] = x
    store_mod.mark_complete(str(path))
    return path, data


def test_layout_and_attributes(tmp_path):
    path, _ = _filled(tmp_path / "s")
    st = open_store(str(path))
    assert st.attrs["format"] == "edice-track-store" and st.attrs["transform"] == "arcsinh"
    assert st.genome == GENOME and st.tracks == TRACKS
    assert st.cell_keys == ["brain", "brain@p1", "liver"]
    assert st.assays == ["DNase", "H3K27ac", "H3K4me3"]
    arr = st.array("chr1")
    assert arr.shape == (101, 4) and arr.chunks == (30, 4) and arr.dtype == np.float16
    assert arr.metadata.dimension_names == ("bin", "track")
    # odd contig names get a safe array key
    assert st.array_key("chrUn_KI270302v1") == "chrUn_KI270302v1"
    assert st.array_key("HLA-A*01:01") == "chrom_00002"
    assert st.array("HLA-A*01:01").shape == (11, 4)  # ceil(260 / 25)
    assert list(st.split_indices("train")) == [0, 3]
    assert list(st.split_indices("val", "test")) == [1, 2]
    assert [(c.chrom, c.start, c.stop) for c in st.chunks(["chrUn_KI270302v1"])] == [
        ("chrUn_KI270302v1", 0, 30), ("chrUn_KI270302v1", 30, 40)]
    with pytest.raises(InputError, match="chr9 is not in store"):
        st.array("chr9")


@pytest.mark.parametrize("dtype,rtol", [("float16", 2.0**-11), ("float32", 1e-7)])
def test_read_windows_across_chunks(tmp_path, dtype, rtol):
    path, data = _filled(tmp_path / "s", dtype=dtype)
    st = open_store(str(path))
    for a, b in [(0, 101), (25, 65), (29, 31), (90, 101), (7, 7)]:
        got = st.read("chr1", a, b)
        assert got.dtype == np.float32 and got.shape == (b - a, 4)
        np.testing.assert_allclose(got, data["chr1"][a:b], rtol=rtol, atol=1e-7)
    got = st.read("chr1", 55, 95, columns=[3, 0])
    np.testing.assert_allclose(got, data["chr1"][55:95][:, [3, 0]], rtol=rtol)
    for a, b in [(-1, 5), (5, 102), (6, 5)]:
        with pytest.raises(ValueError, match="outside chr1"):
            st.read("chr1", a, b)


def test_a_store_knows_its_chunks(tmp_path):
    """Unwritten or deleted chunks are errors naming the chunk file, never zeros (zarr's
    fill value); a damaged chunk is an error naming it too (the CRC32C codec)."""
    create(str(tmp_path / "s"), GENOME, TRACKS, chunk_bins=30)
    with pytest.raises(InputError, match="unfinished track store"):
        open_store(str(tmp_path / "s"))  # not finalised
    with pytest.raises(EdiceError, match=r"lacks 7 chunk file\(s\) \(signal/chr1/c/0/0"):
        store_mod.mark_complete(str(tmp_path / "s"))
    assert "finalised" not in json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]

    path, data = _filled(tmp_path / "f", dtype="float32")
    os.remove(path / "signal" / "chr1" / "c" / "1" / "0")
    st = open_store(str(path))
    np.testing.assert_allclose(st.read("chr1", 0, 30), data["chr1"][:30], rtol=1e-7)
    with pytest.raises(InputError, match=r"chr1 bins 25-65: The chunk file .*signal/chr1/c/1/0 "
                                         "is missing"):
        st.read("chr1", 25, 65)
    chunk = path / "signal" / "chr1" / "c" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one damaged byte inside the compressed data
    chunk.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"chr1 bins 60-90 \(chunk file .*signal/chr1/c/2/0\).*"
                                         "checksum.*damaged"):
        st.read("chr1", 60, 90)


def test_default_codec_round_trips(tmp_path):
    for dtype in ("float16", "float32"):
        codecs = store_mod.default_codecs(dtype)
        assert codecs, "a store is compressed by default"
        path, data = _filled(tmp_path / dtype, dtype=dtype)
        st = open_store(str(path))
        assert st.attrs["codec"] == [c.to_dict() for c in codecs]
        assert np.array_equal(st.array("chr1")[:], data["chr1"].astype(dtype))


def test_open_store_errors(tmp_path):
    with pytest.raises(InputError, match="No track store") as e:
        open_store(str(tmp_path / "none"))
    assert "unfinished" not in str(e.value)

    (tmp_path / "half.partial").mkdir()
    create(str(tmp_path / "half.partial"), GENOME, TRACKS)
    with pytest.raises(InputError, match="unfinished ingest") as e:
        open_store(str(tmp_path / "half"))
    assert "half.partial" in str(e.value) and "same arguments" in str(e.value)

    zarr.open_group(str(tmp_path / "other"), mode="w").attrs["format"] = "something"
    with pytest.raises(InputError, match="not an edice track store"):
        open_store(str(tmp_path / "other"))

    path, _ = _filled(tmp_path / "new")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = store_mod.FORMAT_VERSION + 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="Upgrade edice-dist"):
        open_store(str(path))

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable Zarr store"):
        open_store(str(tmp_path / "junk"))


def test_presence_matrix():
    cells, assays, m = presence_matrix(TRACKS)
    assert cells == ["brain", "brain@p1", "liver"]
    assert assays == ["DNase", "H3K27ac", "H3K4me3"]
    expected = [[".", ".", "t"], [".", "x", "."], ["v", ".", "x"]]
    assert m.tolist() == expected


def test_describe_and_info(tmp_path, capsys):
    path, _ = _filled(tmp_path / "s")
    text = describe(str(path))
    assert main(["info", str(path)]) == 0
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.split() == ["DNase", "H3K27ac", "H3K4me3"])
    rows = [ln.split() for ln in lines[i + 1:i + 4]]
    assert rows == [["brain", ".", ".", "t"], ["brain@p1", ".", "x", "."],
                    ["liver", "v", ".", "x"]]
    assert "encoding     float16, blosc" in text
    assert "3 chromosomes, 152 bins" in text
    assert "HLA-A*01:01" in text and "2,513 bp" in text and "101 bins" in text
    assert "4 (2 train, 1 val, 1 test)" in text
    du = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert f"{du / 2**20:,.1f} MiB" in text
    assert f"{du / (152 * 4):.3f} bytes per bin x track" in text


def test_describe_points_to_partial(tmp_path):
    create(str(tmp_path / "s.partial"), GENOME, TRACKS)
    with pytest.raises(InputError, match="s.partial"):
        describe(str(tmp_path / "s"))
