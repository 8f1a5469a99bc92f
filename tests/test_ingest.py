"""`edice ingest`: store contents against an independent pyBigWig/numpy computation, bad
inputs through the CLI, resume after a failure, --force and re-runs."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyBigWig
import pytest
from failcheck import changes, cli, paragraph, tree

from edice_dist import _faults, _partial
from edice_dist.cli import main
from edice_dist.store import open_store

SIZES = {"chr1": 10_013, "chr2": 6_000, "chr3": 2_510}  # chr1, chr3: partial last bins
CHUNK = 64  # chr1: 401 bins = 7 chunks, chr2: 240 = 4, chr3: 101 = 2


# ------------------------------------------------------------------ fixtures
def _bw(path, header, entries):
    """entries: (chrom, starts, ends, values) lists, in header order."""
    bw = pyBigWig.open(str(path), "w")
    bw.addHeader(list(header))
    for chrom, s, e, v in entries:
        bw.addEntries([chrom] * len(s), [int(x) for x in s], ends=[int(x) for x in e],
                      values=[float(x) for x in v])
    bw.close()


def _fixed(path, rng, step, chroms, sizes=SIZES):
    bw = pyBigWig.open(str(path), "w")
    bw.addHeader([(c, sizes[c]) for c in chroms])
    for c in chroms:
        n = sizes[c] // step
        vals = rng.gamma(0.7, 2.0, n) * (rng.random(n) < 0.8)
        bw.addEntries(c, 0, values=vals.astype(np.float64), span=step, step=step)
    bw.close()


def _runs(rng, size, max_len=180, keep=0.7):
    """Variable-width intervals with gaps covering [0, size)."""
    cuts = np.unique(np.concatenate([[0, size], rng.integers(1, size, size // 40)]))
    s, e = cuts[:-1], cuts[1:]
    sel = rng.random(len(s)) < keep
    vals = np.round(rng.gamma(0.8, 3.0, len(s)), 3)
    return s[sel], e[sel], vals[sel]


def _bedgraph(path, rng, chroms, gz=False):
    lines = ["track type=bedGraph name=test"]
    for c in chroms:
        for s, e, v in zip(*_runs(rng, SIZES[c]), strict=True):
            lines.append(f"{c}\t{s}\t{e}\t{v}")
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def _write_sizes(path, sizes=SIZES):
    with open(path, "w") as f:
        f.writelines(f"{c}\t{s}\n" for c, s in sizes.items())


def _manifest(path, rows):
    with open(path, "w") as f:
        f.write("cell_type\tassay\tpath\tsplit\n")
        f.writelines("\t".join(r) + "\n" for r in rows)


ROWS = [
    ("C1", "A1", "fixed25.bw", "train"),
    ("C1", "A2", "fixed10.bw", "train"),
    ("C2", "A1", "variable.bigWig", "train"),
    ("C2", "A2", "runs.bedGraph.gz", "val"),
    ("C3", "A1", "bp1.bw", "train"),
    ("C3", "A2", "runs2.bg", "test"),
]


def _make_sources(d, seed=0):
    rng = np.random.default_rng(seed)
    _fixed(d / "fixed25.bw", rng, 25, ["chr1", "chr2", "chr3"])
    _fixed(d / "fixed10.bw", rng, 10, ["chr1", "chr2"])  # no chr3: reads as zeros
    header = [("chr1", SIZES["chr1"]), ("chr2", SIZES["chr2"]), ("chrUn_x", 5000)]
    _bw(d / "variable.bigWig", header,
        [(c, *_runs(rng, n)) for c, n in header])  # chrUn_x is not in the genome
    _bedgraph(d / "runs.bedGraph.gz", rng, ["chr1", "chr2", "chr3"], gz=True)
    _fixed(d / "bp1.bw", rng, 1, ["chr1", "chr3"])
    _bedgraph(d / "runs2.bg", rng, ["chr2", "chr3"])
    _write_sizes(d / "chrom.sizes")
    _manifest(d / "manifest.tsv", ROWS)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    d = tmp_path_factory.mktemp("consortium")
    _make_sources(d)
    return d


# ------------------------------------------------------------------ reference
def _per_base_bigwig(path, chrom, size):
    bw = pyBigWig.open(str(path))
    try:
        if chrom not in bw.chroms():
            return np.zeros(size)
        v = np.zeros(size)
        n = min(size, bw.chroms()[chrom])
        v[:n] = np.nan_to_num(np.asarray(bw.values(chrom, 0, n, numpy=True), dtype=np.float64))
        return v
    finally:
        bw.close()


def _per_base_bedgraph(path, chrom, size):
    opener = gzip.open if str(path).endswith(".gz") else open
    v = np.zeros(size)
    with opener(path, "rt") as f:
        for line in f:
            p = line.split()
            if p[0] == chrom:
                v[int(p[1]):int(p[2])] = float(p[3])
    return v


def reference(path, chrom, size):
    """arcsinh of 25 bp means, the last bin over its real bases only."""
    path = str(path)
    if path.endswith((".gz", ".bg", ".bedGraph")):
        v = _per_base_bedgraph(path, chrom, size)
    else:
        v = _per_base_bigwig(path, chrom, size)
    nb = -(-size // 25)
    pad = np.zeros(nb * 25)
    pad[:size] = v
    width = np.full(nb, 25.0)
    width[-1] = size - (nb - 1) * 25
    return np.arcsinh(pad.reshape(nb, 25).sum(axis=1) / width)


TOL = {"float16": dict(rtol=2.0**-11, atol=1e-7), "float32": dict(rtol=2e-7, atol=1e-9)}


def _ingest(args, capsys=None):
    rc = main(["ingest", *map(str, args)])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


@pytest.fixture(scope="module")
def built(consortium, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "store.zarr"
    rc = main(["ingest", str(consortium / "manifest.tsv"), "--chrom-sizes",
               str(consortium / "chrom.sizes"), "--out", str(out), "--chunk-bins", str(CHUNK)])
    assert rc == 0
    return out


# ------------------------------------------------------------------ contents
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_matches_independent_means(consortium, built, ray_local, tmp_path, dtype):
    if dtype == "float16":
        out = built
    else:
        from edice_dist.ingest import ingest

        out = ingest(str(consortium / "manifest.tsv"), str(consortium / "chrom.sizes"),
                     str(tmp_path / "s32"), chunk_bins=100, dtype="float32")
    st = open_store(str(out))
    assert st.attrs["dtype"] == dtype
    assert [t.track_id for t in st.tracks] == [f"{r[0]}-{r[1]}" for r in ROWS]
    for chrom, size in SIZES.items():
        arr = st.array(chrom)
        assert arr.shape == (-(-size // 25), len(ROWS))
        got = st.read(chrom, 0, arr.shape[0])
        for j, row in enumerate(ROWS):
            ref = reference(consortium / row[2], chrom, size)
            np.testing.assert_allclose(got[:, j], ref, **TOL[dtype],
                                       err_msg=f"{row[2]} {chrom}")
    # not vacuous: every track has signal, and a partial last bin is non-zero somewhere
    assert (st.read("chr1", 0, 401).max(axis=0)[[0, 1, 2, 3, 4]] > 0.5).all()
    assert st.read("chr2", 0, 240)[:, 5].max() > 0.5


def test_window_across_chunks_and_last_partial_bin(consortium, built):
    st = open_store(str(built))
    assert st.chunk_bins == CHUNK and st.array("chr1").chunks == (CHUNK, len(ROWS))
    # bins 50..80 span chunks 0 and 1
    win = st.read("chr1", 50, 80, columns=[0, 3])
    for k, j in enumerate([0, 3]):
        ref = reference(consortium / ROWS[j][2], "chr1", SIZES["chr1"])[50:80]
        np.testing.assert_allclose(win[:, k], ref, **TOL["float16"])
    # chr1 ends 13 bp into its last bin: the mean is over those 13 bases, by hand
    bw = pyBigWig.open(str(consortium / "bp1.bw"))
    tail = np.nan_to_num(np.asarray(bw.values("chr1", 10_000, 10_013), dtype=np.float64))
    bw.close()
    assert tail.sum() > 0
    last = st.read("chr1", 400, 401)[0, 4]
    np.testing.assert_allclose(last, np.arcsinh(tail.mean()), rtol=2.0**-11)
    assert abs(last - np.arcsinh(tail.sum() / 25)) > 1e-3  # not a padded 25 bp mean


def test_missing_chromosome_is_zero_and_extra_is_ignored(consortium, ray_local, tmp_path, capsys):
    out = tmp_path / "s"
    rc, err = _ingest([consortium / "manifest.tsv", "--chrom-sizes", consortium / "chrom.sizes",
                       "--out", out, "--chunk-bins", 500], capsys)
    assert rc == 0
    assert "chrUn_x" in err and "ignoring" in err and "variable.bigWig" in err
    st = open_store(str(out))
    assert np.all(st.read("chr3", 0, 101)[:, 1] == 0)  # fixed10.bw has no chr3
    assert [c for c in st.genome.chroms] == list(SIZES)
    for step in ("[1/4] validate", "[2/4] init", "[3/4] encode", "[4/4] finalise"):
        assert step in err
    # same inputs again: nothing to do
    before = os.stat(out / "zarr.json").st_mtime_ns
    rc, err = _ingest([consortium / "manifest.tsv", "--chrom-sizes", consortium / "chrom.sizes",
                       "--out", out, "--chunk-bins", 500], capsys)
    assert rc == 0 and "up to date" in err
    assert os.stat(out / "zarr.json").st_mtime_ns == before


def test_chroms_option_subsets_the_genome(consortium, ray_local, tmp_path, capsys):
    out = tmp_path / "s"
    rc, _ = _ingest([consortium / "manifest.tsv", "--chrom-sizes", consortium / "chrom.sizes",
                     "--out", out, "--chroms", "chr2", "--dtype", "float32"], capsys)
    assert rc == 0
    st = open_store(str(out))
    assert st.genome.chroms == ("chr2",)
    ref = reference(consortium / "runs2.bg", "chr2", SIZES["chr2"])
    np.testing.assert_allclose(st.read("chr2", 0, 240)[:, 5], ref, **TOL["float32"])


# ------------------------------------------------------------------ bad inputs
def _good(d):
    rng = np.random.default_rng(1)
    _fixed(d / "ok.bw", rng, 25, ["chr1", "chr2"])
    _write_sizes(d / "chrom.sizes")
    return d / "ok.bw"


def _with_values(d, chrom, bad_value):
    rng = np.random.default_rng(2)
    vals = {c: rng.gamma(1, 1, SIZES[c] // 25) for c in ("chr1", "chr2")}
    vals[chrom][17] = bad_value
    bw = pyBigWig.open(str(d / "bad.bw"), "w")
    bw.addHeader([(c, SIZES[c]) for c in ("chr1", "chr2")])
    for c in ("chr1", "chr2"):
        bw.addEntries(c, 0, values=vals[c].tolist(), span=25, step=25)  # a list takes inf
    bw.close()


def _case_missing(d):
    _manifest(d / "m.tsv", [("C1", "A1", "ok.bw", "train"), ("C2", "A1", "nope.bw", "train")])
    return ["nope.bw", "C2-A1", "does not exist"]


def _case_not_bigwig(d):
    (d / "bad.bw").write_text("hello, this is not a bigWig\n")
    return ["bad.bw", "neither a bigWig", "corrupted"]


def _case_truncated(d):
    (d / "bad.bw").write_bytes((d / "ok.bw").read_bytes()[:100])
    return ["bad.bw", "C2-A1", "truncated"]


def _case_bigbed(d):
    (d / "bad.bw").write_bytes(b"\xeb\xf2\x89\x87" + bytes(200))
    return ["bad.bw", "bigBed"]


def _case_folder(d):
    (d / "bad.bw").mkdir()
    return ["bad.bw", "folder"]


def _case_chr_prefix(d):
    _bw(d / "bad.bw", [("1", 10_013), ("2", 6_000)], [("1", [0], [100], [1.0])])
    return ["bad.bw", "shares no chromosome", "'chr' prefix", "1, 2", "chr1, chr2, chr3"]


def _case_too_long(d):
    _bw(d / "bad.bw", [("chr1", 20_000)], [("chr1", [0], [100], [1.0])])
    return ["bad.bw", "chr1", "20,000", "10,013"]


def _case_nan(d):
    _with_values(d, "chr2", float("nan"))
    return ["bad.bw", "C2-A1", "chr2", "NaN"]


def _case_inf(d):
    _with_values(d, "chr2", float("inf"))
    return ["bad.bw", "C2-A1", "chr2", "infinite"]


def _case_negative(d):
    _with_values(d, "chr1", -0.5)
    return ["bad.bw", "C2-A1", "chr1", "negative"]


def _bg_case(text):
    def case(d):
        (d / "bad.bedGraph").write_text(text)
        _manifest(d / "m.tsv", [("C1", "A1", "ok.bw", "train"),
                                ("C2", "A1", "bad.bedGraph", "train")])
        return None
    return case


CASES = {
    "missing file": (_case_missing, None),
    "not a bigWig": (_case_not_bigwig, None),
    "truncated bigWig": (_case_truncated, None),
    "bigBed": (_case_bigbed, None),
    "folder": (_case_folder, None),
    "chr prefix": (_case_chr_prefix, None),
    "too long": (_case_too_long, None),
    "NaN": (_case_nan, None),
    "inf": (_case_inf, None),
    "negative": (_case_negative, None),
    "bedGraph unsorted": (_bg_case("chr1\t100\t200\t1\nchr1\t0\t50\t1\n"),
                          ["bad.bedGraph", "line 2", "not sorted"]),
    "bedGraph chromosomes interleaved": (
        _bg_case("chr1\t0\t50\t1\nchr2\t0\t50\t1\nchr1\t60\t70\t1\n"),
        ["bad.bedGraph", "line 3", "not sorted"]),
    "bedGraph overlap": (_bg_case("chr1\t0\t100\t1\nchr1\t50\t200\t2\n"),
                         ["bad.bedGraph", "line 2", "overlaps"]),
    "bedGraph negative": (_bg_case("chr1\t0\t100\t1\nchr1\t100\t200\t-2\n"),
                          ["bad.bedGraph", "line 2", "-2", "non-negative"]),
    "bedGraph nan": (_bg_case("chr1\t0\t100\tnan\n"), ["bad.bedGraph", "line 1", "nan"]),
    "bedGraph past the end": (_bg_case("chr1\t10000\t10020\t1\n"),
                              ["bad.bedGraph", "ends after the end of chr1", "10,013"]),
    "bedGraph not numbers": (_bg_case("chr1\t0\t100\t1\nchr1\tx\t200\t2\n"),
                             ["bad.bedGraph", "line 2", "integers"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_source_is_refused_and_no_store(name, ray_local, tmp_path, capsys):
    _good(tmp_path)
    make, expected = CASES[name]
    _manifest(tmp_path / "m.tsv", [("C1", "A1", "ok.bw", "train"),
                                   ("C2", "A1", "bad.bw", "train")])
    expected = make(tmp_path) or expected
    out = tmp_path / "out.zarr"
    rc, err = _ingest([tmp_path / "m.tsv", "--chrom-sizes", tmp_path / "chrom.sizes",
                       "--out", out, "--chunk-bins", 64], capsys)
    assert rc != 0
    msg = err.split("edice ingest: error:", 1)[1]
    for s in expected:
        assert s in msg, (s, msg)
    assert not out.exists()
    # header problems leave nothing; value problems keep finished chunks for a resume
    partial = _partial.partial_path(str(out))
    assert os.path.exists(partial) == (name in ("NaN", "inf", "negative"))


def test_same_problem_in_every_source_is_said_once(ray_local, tmp_path, capsys):
    _write_sizes(tmp_path / "chrom.sizes")
    rows = []
    for i in range(3):
        _bw(tmp_path / f"s{i}.bw", [("1", 10_013)], [("1", [0], [100], [1.0])])
        rows.append((f"C{i}", "A1", f"s{i}.bw", "train"))
    _manifest(tmp_path / "m.tsv", rows)
    out = tmp_path / "out.zarr"
    rc, err = _ingest([tmp_path / "m.tsv", "--chrom-sizes", tmp_path / "chrom.sizes",
                       "--out", out], capsys)
    assert rc != 0
    assert err.count("shares no chromosome") == 1
    assert "s0.bw" in err and "affects 2 more source(s)" in err
    assert not out.exists()


@pytest.mark.parametrize("manifest,expected", [
    ("cell_type\tassay\tpath\nC1\tA1\tok.bw\nC1\tA1\tok.bw\n", ["line 3", "listed twice"]),
    ("cell_type\tassay\nC1\tA1\n", ["lacks the column(s) path"]),
    ("", ["is empty"]),
    ("cell_type\tassay\tpath\n", ["no tracks"]),
])
def test_bad_manifest_is_refused(manifest, expected, tmp_path, capsys):
    _good(tmp_path)
    (tmp_path / "m.tsv").write_text(manifest)
    out = tmp_path / "out.zarr"
    rc, err = _ingest([tmp_path / "m.tsv", "--chrom-sizes", tmp_path / "chrom.sizes",
                       "--out", out], capsys)
    assert rc != 0 and "m.tsv" in err
    for s in expected:
        assert s in err
    assert not out.exists() and not os.path.exists(_partial.partial_path(str(out)))


@pytest.mark.parametrize("extra,expected", [
    (["--chroms", "chr9"], "chr9"),
    (["--chunk-bins", "0"], "--chunk-bins"),
])
def test_bad_options_are_refused(extra, expected, tmp_path, capsys):
    _good(tmp_path)
    _manifest(tmp_path / "m.tsv", [("C1", "A1", "ok.bw", "train")])
    rc, err = _ingest([tmp_path / "m.tsv", "--chrom-sizes", tmp_path / "chrom.sizes",
                       "--out", tmp_path / "o", *extra], capsys)
    assert rc != 0 and expected in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ resume, force
def _chunk_mtimes(root):
    out = {}
    sig = os.path.join(root, "signal")
    for d, _, files in os.walk(sig):
        for f in files:
            if f != "zarr.json":
                p = os.path.join(d, f)
                out[os.path.relpath(p, sig)] = os.stat(p).st_mtime_ns
    return out


def _arrays(path):
    st = open_store(str(path))
    return {c: st.array(c)[:] for c in st.genome.chroms}


def test_interrupted_ingest_resumes_and_matches_clean_run(consortium, ray_local, tmp_path,
                                                          capsys, monkeypatch):
    args = [consortium / "manifest.tsv", "--chrom-sizes", consortium / "chrom.sizes",
            "--chunk-bins", CHUNK, "--workers", 1]
    out = tmp_path / "store.zarr"
    partial = _partial.partial_path(str(out))
    monkeypatch.setenv(_faults.ENV, json.dumps({"ingest_fail_chunk": "chr2:1"}))
    rc, err = _ingest([*args, "--out", out], capsys)
    assert rc != 0 and "fault injected" in err and "resumes" in err
    assert not out.exists()
    # one task at a time, partitions in genome order: all of chr1 and chunk 0 of chr2
    assert _partial.done_set(partial) == {("chr1", i) for i in range(7)} | {("chr2", 0)}
    before = _chunk_mtimes(partial)
    assert len(before) >= 8

    monkeypatch.delenv(_faults.ENV)
    rc, err = _ingest([*args, "--out", out], capsys)
    assert rc == 0 and "resuming: 8 of 13 chunks already written" in err
    assert not os.path.exists(partial)
    after = _chunk_mtimes(out)
    assert all(after[k] == v for k, v in before.items())  # those chunks were not rewritten
    assert len(after) > len(before)

    rc, _ = _ingest([*args, "--out", tmp_path / "clean.zarr"], capsys)
    assert rc == 0
    a, b = _arrays(out), _arrays(tmp_path / "clean.zarr")
    assert a.keys() == b.keys()
    for c in a:
        assert np.array_equal(a[c], b[c]), c


def test_changed_inputs_restart_the_partial(consortium, ray_local, tmp_path, capsys,
                                            monkeypatch):
    d = tmp_path / "src"
    d.mkdir()
    _make_sources(d, seed=5)
    args = [d / "manifest.tsv", "--chrom-sizes", d / "chrom.sizes", "--chunk-bins", CHUNK,
            "--out", tmp_path / "s.zarr"]
    monkeypatch.setenv(_faults.ENV, json.dumps({"ingest_fail_chunk": "chr3:0"}))
    rc, _ = _ingest(args, capsys)
    assert rc != 0
    monkeypatch.delenv(_faults.ENV)
    _fixed(d / "fixed25.bw", np.random.default_rng(9), 25, ["chr1", "chr2", "chr3"])
    rc, err = _ingest(args, capsys)
    assert rc == 0 and "starting it again" in err and "resuming" not in err
    st = open_store(str(tmp_path / "s.zarr"))
    ref = reference(d / "fixed25.bw", "chr1", SIZES["chr1"])
    np.testing.assert_allclose(st.read("chr1", 0, 401)[:, 0], ref, **TOL["float16"])


def test_force_semantics(consortium, ray_local, tmp_path, capsys):
    d = consortium
    _manifest(tmp_path / "m1.tsv", [(c, a, str(d / p), s) for c, a, p, s in ROWS[:2]])
    _manifest(tmp_path / "m2.tsv", [(c, a, str(d / p), s) for c, a, p, s in ROWS[2:]])
    out = tmp_path / "store.zarr"
    base = ["--chrom-sizes", d / "chrom.sizes", "--out", out]
    assert _ingest([tmp_path / "m1.tsv", *base], capsys)[0] == 0

    rc, err = _ingest([tmp_path / "m2.tsv", *base], capsys)
    assert rc != 0 and "already exists" in err and "--force" in err
    assert open_store(str(out)).n_tracks == 2  # untouched

    # a --force run that fails while encoding keeps the old store
    _with_values(tmp_path, "chr2", float("nan"))
    _manifest(tmp_path / "m3.tsv", [("X", "Y", str(tmp_path / "bad.bw"), "train")])
    rc, err = _ingest([tmp_path / "m3.tsv", *base, "--force"], capsys)
    assert rc != 0 and "NaN" in err and "[3/4] encode" in err
    assert open_store(str(out)).n_tracks == 2

    rc, err = _ingest([tmp_path / "m2.tsv", *base, "--force"], capsys)
    assert rc == 0
    st = open_store(str(out))
    assert [t.track_id for t in st.tracks] == [f"{r[0]}-{r[1]}" for r in ROWS[2:]]
    np.testing.assert_allclose(st.read("chr2", 0, 240)[:, 0],
                               reference(d / "variable.bigWig", "chr2", SIZES["chr2"]),
                               **TOL["float16"])

    # something that is not a store at --out is refused too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, err = _ingest([tmp_path / "m1.tsv", "--chrom-sizes", d / "chrom.sizes",
                       "--out", tmp_path / "other"], capsys)
    assert rc != 0 and "not a track store" in err
    assert (tmp_path / "other" / "notes.txt").exists()


def test_info_shows_presence_matrix(built, capsys):
    assert main(["info", str(built)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.split() == ["A1", "A2"])
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[lines.index(header) + 1:]
            if ln.startswith("  C")}
    assert rows == {"C1": ["x", "x"], "C2": ["x", "v"], "C3": ["x", "t"]}
    assert "chr1" in out and "10,013" in out and "401" in out
    assert "size on disk" in out and "6 (4 train, 1 val, 1 test)" in out


def test_source_edge_cases(tmp_path):
    from edice_dist.genome import Genome
    from edice_dist.sources import check_chroms, open_source

    genome = Genome(("chr1", "chr2"), (1_000, 510))
    _bw(tmp_path / "e.bw", [("chr1", 1_000), ("chr2", 510), ("chrM", 100)],
        [("chr2", [0, 500], [10, 510], [2.0, 5.0]), ("chrM", [0], [5], [1.0])])
    with open_source(str(tmp_path / "e.bw"), genome, label="c-a") as s:
        assert not s.binned("chr1", 0, 40).any()  # a chromosome without intervals
        got = s.binned("chr2", 0, 21)
        assert got[0] == pytest.approx(2.0 * 10 / 25)
        assert got[20] == pytest.approx(5.0)  # the last bin holds 10 real bases, all at 5
        assert not got[1:20].any()
        with pytest.raises(ValueError, match="outside chr2"):
            s.binned("chr2", 0, 22)
        warnings = check_chroms(s, genome, "c-a")
        assert len(warnings) == 1 and "chrM" in warnings[0] and "c-a" in warnings[0]
    (tmp_path / "z.bedGraph").write_text("chr1\t0\t100\t0\nchr1\t100\t200\t0\n")
    with open_source(str(tmp_path / "z.bedGraph"), genome) as s:
        assert s.kind == "bedgraph" and not s.binned("chr1", 0, 40).any()


# ------------------------------------------------------------------ the failure table (issue 10)
def test_force_never_replaces_a_folder_that_is_not_a_store(consortium, ray_local, tmp_path,
                                                           capsys):
    """Row: ``edice ingest --out DIR --force`` on a folder that is not a store deleted the
    folder. --force replaces a store only; the folder and all around it are untouched."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    rc, err = _ingest([consortium / "manifest.tsv", "--chrom-sizes", consortium / "chrom.sizes",
                       "--out", other, "--force"], capsys)
    line = paragraph(err, "edice ingest")
    assert rc == 1 and f"--out {other} is not a track store" in line and "notes.txt" in line
    assert changes(before, tree(tmp_path)) == []


def test_unfinished_store_is_not_an_input(consortium, ray_local, tmp_path, capsys, monkeypatch):
    """Row: ``--store STORE.partial`` (an unfinished ingest) was accepted, imputing from
    all-zero inputs, and `edice info` called it a normal store."""
    out = tmp_path / "store.zarr"
    monkeypatch.setenv(_faults.ENV, json.dumps({"ingest_fail_chunk": "chr2:1"}))
    rc, _ = _ingest([consortium / "manifest.tsv", "--chrom-sizes", consortium / "chrom.sizes",
                     "--out", out, "--chunk-bins", CHUNK, "--workers", 1], capsys)
    monkeypatch.delenv(_faults.ENV)
    partial = _partial.partial_path(str(out))
    assert rc == 1 and os.path.isdir(partial)
    before = tree(tmp_path)
    rc, err = cli(["impute", "--store", partial, "--model", tmp_path / "model", "--out",
                   tmp_path / "run"], capsys)
    line = paragraph(err, "edice impute")
    assert rc == 1 and f"{partial} is an unfinished track store" in line
    assert "Re-run the same `edice ingest`" in line
    assert main(["info", partial]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"unfinished track store {partial}") and "chunks       8/13" in text
    assert changes(before, tree(tmp_path)) == []


def test_a_retried_task_reaches_100_percent(consortium, ray_local, tmp_path, capsys,
                                            monkeypatch):
    """Row: an ingest task retried after a failure (its worker died part-way) left the
    progress line short of 100 %: the retry did not count the chunks the failed attempt
    had already written."""
    out = tmp_path / "store.zarr"
    monkeypatch.setenv(_faults.ENV, json.dumps({"ingest_exit_chunk": "chr1:1"}))
    rc, err = _ingest([consortium / "manifest.tsv", "--chrom-sizes", consortium / "chrom.sizes",
                       "--out", out, "--chunk-bins", CHUNK], capsys)
    assert rc == 0
    assert (out / _faults.MARKER).read_text() == "chr1\t1\n"  # the worker did die there
    assert "encode: 13/13 chunks (100%)" in err


def test_manifest_with_a_byte_order_mark(consortium, tmp_path):
    """Row: a manifest starting with a UTF-8 byte-order mark gave "missing column
    '\\ufeffcell_type'"."""
    from edice_dist.tracks import read_manifest

    text = (consortium / "manifest.tsv").read_text()
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    tracks = read_manifest(str(tmp_path / "bom.tsv"))
    assert [(t.cell_type, t.assay, t.split) for t in tracks] == [(r[0], r[1], r[3]) for r in ROWS]


def test_encode_blocks_of_all_tracks_stay_within_the_byte_budget():
    """What an encode task holds grows with the tracks only up to the budget."""
    from edice_dist import scratch

    for n_tracks in (13, 250, 1000, 4000, 100_000):
        per = scratch.block_chunks(n_tracks, 16384, 2, total_chunks=31, slots=2, most=8)
        assert 1 <= per <= 4  # 31 chunks over 4 x 2 slots
        assert per == 1 or per * n_tracks * 16384 * 2 <= scratch.BLOCK_BYTES
        if per * 2 * n_tracks * 16384 * 2 <= scratch.BLOCK_BYTES and per < 4:
            raise AssertionError(f"{n_tracks} tracks: {per} chunks per block, room for more")
