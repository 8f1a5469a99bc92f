"""A consortium long on the track axis, end to end at a reduced size (300 observed tracks,
300 held out and imputed, a 150 kb genome): every missing pair gets a valid bigWig, the
hub lists each once in composites a browser can open, the evaluation covers every
held-out track with values recomputed here from the bigWigs; and bad input among 1,000
manifest rows is one paragraph that leaves nothing behind (`benchmarks/bench_consortium.py`
runs the same at 250 to 1,000 tracks and measures it)."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pyBigWig
import pytest
from failcheck import cli, paragraph

from edice_dist import _partial

pytestmark = pytest.mark.slow

ASSAYS = ("H3K4me3,H3K4me1,H3K36me3,H3K27me3,H3K9me3,H3K27ac,H3K9ac,DNase,H3K4me2,H2A.Z,"
          "H3K79me2,H4K20me1,H2AK5ac,H2BK120ac,H2BK12ac,H2BK15ac,H2BK20ac,H2BK5ac,H3K14ac,"
          "H3K18ac,H3K23ac,H3K4ac,H3K56ac,H3K79me1").split(",")
N_CELLS, N_OBSERVED = 25, 300  # 600 pairs: half observed, every other one held out
SIM = {"genome_bp": 150_000, "n_chroms": 2, "n_cell_types": N_CELLS, "n_tissues": 5,
       "assays": ",".join(ASSAYS), "core_assays": ",".join(ASSAYS[:5]),
       "core_fraction": 1.0, "other_fraction": 1.0, "n_test": N_CELLS * len(ASSAYS) - N_OBSERVED,
       "variable_fraction": 0.0, "zoom_levels": 0}
TRAIN = {"embed_dim": 16, "n_heads": 2, "ffn_dim": 16, "decoder_hidden": 32, "epochs": 1,
         "bins_per_epoch": 2048, "val_bins": 2048, "n_targets": 60, "refit": "false"}


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def binned(path, chrom, size):
    """25 bp means of a bigWig, missing data as 0 (SPEC 3), with pyBigWig alone."""
    with pyBigWig.open(str(path)) as bw:
        v = np.nan_to_num(bw.values(chrom, 0, size, numpy=True).astype(np.float64))
    n = -(-size // 25)
    return np.array([v[i * 25:(i + 1) * 25].mean() for i in range(n)])


def test_300_tracks_end_to_end(tmp_path, ray_local, capsys):
    cons, store, model, run = (tmp_path / n for n in ("cons", "store", "model", "run"))
    assert cli(["simulate", cons, "--seed", "3", *[f"--{k}={v}" for k, v in SIM.items()]],
               capsys)[0] == 0
    observed = rows(cons / "manifest.tsv")
    truth = rows(cons / "truth" / "targets.tsv")
    assert len(observed) == N_OBSERVED and len(truth) == N_CELLS * len(ASSAYS) - N_OBSERVED
    sizes = dict((c, int(s)) for c, s in (ln.split() for ln in open(cons / "chrom.sizes")))
    assert cli(["ingest", cons / "manifest.tsv", "--chrom-sizes", cons / "chrom.sizes",
                "--out", store], capsys)[0] == 0
    assert cli(["train", "--store", store, "--out", model,
                *[f"--{k}={v}" for k, v in TRAIN.items()]], capsys)[0] == 0
    assert cli(["impute", "--store", store, "--model", model, "--out", run], capsys)[0] == 0
    ev = tmp_path / "evaluation"
    assert cli(["evaluate", "--truth", cons / "truth" / "targets.tsv", "--imputed",
                run / "bigwig", "--store", store, "--out", ev, "--no-plots"], capsys)[0] == 0

    # Every missing pair, from the manifest (not from the run's own target list).
    cells = sorted({r["cell_type"] for r in observed + truth})
    have = {(r["cell_type"], r["assay"]) for r in observed}
    missing = {f"{c}-{a}" for c in cells for a in ASSAYS if (c, a) not in have}
    assert missing == {f"{r['cell_type']}-{r['assay']}" for r in truth}
    bw_dir = run / "bigwig"
    written = {n[:-7] for n in os.listdir(bw_dir) if n.endswith(".bigWig")}
    assert written == missing
    for name in sorted(missing):
        with pyBigWig.open(str(bw_dir / f"{name}.bigWig")) as bw:
            assert bw.chroms() == sizes, name
            for c, s in sizes.items():
                v = bw.values(c, 0, s, numpy=True)
                assert np.isfinite(v).all() and (v >= 0).all(), (name, c)

    # The hub: each imputed track once, one composite per assay, few subtracks shown.
    lines = [ln.strip() for ln in open(bw_dir / "trackDb.txt")]
    urls = [ln.split()[1] for ln in lines if ln.startswith("bigDataUrl ")]
    assert sorted(u[:-7] for u in urls) == sorted(missing)
    assert sum(ln == "compositeTrack on" for ln in lines) == len(ASSAYS)
    shown = [ln for ln in lines if ln.startswith("parent ") and ln.endswith(" on")]
    assert len(ASSAYS) <= len(shown) <= 2 * len(ASSAYS)  # a browser opens a few, not 300

    # The evaluation: a model and an AVG row for every held-out track ...
    got = {(r["cell_type"], r["assay"], r["method"]): r for r in rows(ev / "metrics.tsv")}
    for r in truth:
        for method in ("model", "AVG"):
            assert (r["cell_type"], r["assay"], method) in got, (r, method)
    assert len(got) == 2 * len(truth)
    # ... and its MSEs for one track recomputed from the bigWigs: the imputed one, and AVG
    # as the mean of the observed sources of that assay in the other cell types (the store
    # holds them as float16, hence the tolerance).
    t = truth[len(truth) // 2]
    tid = f"{t['cell_type']}-{t['assay']}"
    y = np.concatenate([np.arcsinh(binned(cons / "truth" / f"{tid}.bigWig", c, s))
                        for c, s in sizes.items()])
    imp = np.concatenate([np.arcsinh(binned(bw_dir / f"{tid}.bigWig", c, s))
                          for c, s in sizes.items()])
    srcs = [cons / r["path"] for r in observed if r["assay"] == t["assay"]]
    avg = np.mean([np.concatenate([np.arcsinh(binned(p, c, s)) for c, s in sizes.items()])
                   for p in srcs], axis=0)
    key = (t["cell_type"], t["assay"])
    assert float(got[(*key, "model")]["mse"]) == pytest.approx(np.mean((y - imp) ** 2), rel=1e-3)
    assert float(got[(*key, "AVG")]["mse"]) == pytest.approx(np.mean((y - avg) ** 2), rel=1e-2)


# ------------------------------------------------------------------ bad input at scale
SIZES = {"chr1": 20_013, "chr2": 8_000}
N_ROWS = 1000


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    """1,000 distinct (cell type, assay) rows, each its own small bigWig."""
    d = tmp_path_factory.mktemp("thousand")
    (d / "chrom.sizes").write_text("".join(f"{c}\t{s}\n" for c, s in SIZES.items()))
    rng = np.random.default_rng(0)
    bw = pyBigWig.open(str(d / "src0000.bw"), "w")
    bw.addHeader(list(SIZES.items()), maxZooms=0)
    for c, s in SIZES.items():
        bw.addEntries(c, 0, values=rng.gamma(0.7, 2.0, s // 25), span=25, step=25)
    bw.close()
    pairs = [(f"cell{i // 20:03d}", f"assay{i % 20:02d}") for i in range(N_ROWS)]
    for i in range(1, N_ROWS):
        shutil.copyfile(d / "src0000.bw", d / f"src{i:04d}.bw")
    return d, pairs


def _manifest(path, items):
    path.write_text("cell_type\tassay\tpath\n"
                    + "".join(f"{c}\t{a}\t{p}\n" for c, a, p in items))


def _nothing_left(out):
    assert not out.exists() and not os.path.exists(_partial.partial_path(str(out)))


def test_a_duplicated_pair_among_1000_rows(thousand, tmp_path, capsys):
    d, pairs = thousand
    items = [(c, a, d / f"src{i:04d}.bw") for i, (c, a) in enumerate(pairs)]
    items.insert(700, (pairs[123][0], pairs[123][1], d / "src0999.bw"))  # line 702
    _manifest(tmp_path / "m.tsv", items)
    out = tmp_path / "store"
    rc, err = cli(["ingest", tmp_path / "m.tsv", "--chrom-sizes", d / "chrom.sizes",
                   "--out", out], capsys)
    msg = paragraph(err, "edice ingest")
    assert rc != 0
    for s in ("m.tsv", "line 702", "listed twice", pairs[123][0], pairs[123][1]):
        assert s in msg, (s, msg)
    _nothing_left(out)


def test_one_unreadable_source_among_1000(thousand, tmp_path, ray_local, capsys):
    d, pairs = thousand
    bad = tmp_path / "bad.bw"
    bad.write_bytes((d / "src0000.bw").read_bytes()[:300])  # truncated in its index
    items = [(c, a, bad if i == 617 else d / f"src{i:04d}.bw") for i, (c, a) in enumerate(pairs)]
    _manifest(tmp_path / "m.tsv", items)
    out = tmp_path / "store"
    rc, err = cli(["ingest", tmp_path / "m.tsv", "--chrom-sizes", d / "chrom.sizes",
                   "--out", out], capsys)
    msg = paragraph(err, "edice ingest")
    assert rc != 0
    for s in (str(bad), f"{pairs[617][0]}-{pairs[617][1]}"):
        assert s in msg, (s, msg)
    assert sum(f"src{i:04d}.bw" in msg for i in range(N_ROWS)) == 0  # only the bad one
    _nothing_left(out)
