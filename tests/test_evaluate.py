"""`edice evaluate` end to end on a tiny hand-made genome: bigWigs and a store written here,
every value checked against numpy / scipy / sklearn computations of the same definitions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyBigWig
import pytest
from test_metrics import assert_matches, reference

from edice_dist import store as store_mod
from edice_dist.errors import InputError
from edice_dist.evaluate import evaluate, job_chunks, plan_jobs
from edice_dist.genome import Genome
from edice_dist.metrics import METRICS
from edice_dist.tracks import Track
from edice_dist.truth import imputed_paths, read_truth

SIZES = {"chrA": 2400 * 25, "chrB": 1100 * 25 + 10}  # chrB's last bin has 10 bases
GENOME = Genome(tuple(SIZES), tuple(SIZES.values()))
NB = {c: -(-s // 25) for c, s in SIZES.items()}
N = sum(NB.values())
# (cell_type, individual, assay, split) of the store; the truth is c1@i1 A and c2@i2 B.
STORE_TRACKS = [
    ("c1", "i1", "A", "test"),  # the held-out truth itself: never a baseline input
    ("c1", "i2", "A", "train"),
    ("c1", "i3", "A", "val"),
    ("c2", "i1", "A", "train"),
    ("c3", "i1", "A", "test"),  # test: excluded from AVG
    ("c1", "i1", "B", "train"),
    ("c2", "i1", "B", "train"),
    ("c3", "i2", "B", "train"),
]
TRUTH = [("c1", "i1", "A"), ("c2", "i2", "B")]


def write_bigwig(path, values: dict[str, np.ndarray]) -> None:
    """Fixed 25 bp steps; the last bin of a chromosome ends at its end."""
    bw = pyBigWig.open(str(path), "w")
    bw.addHeader(list(SIZES.items()), maxZooms=0)
    for c, v in values.items():
        full = len(v) - (1 if SIZES[c] % 25 else 0)
        bw.addEntries(c, 0, values=v[:full].astype(np.float64), span=25, step=25)
        if full < len(v):
            bw.addEntries([c], [full * 25], ends=[SIZES[c]], values=[float(v[-1])])
    bw.close()


def signal(rng, shared):
    """-log10 p-like values: a shared pattern plus track noise, float32, >= 0."""
    return {c: np.maximum(0, shared[c] * rng.uniform(0.5, 1.5) + rng.gamma(0.3, 1.0, NB[c]))
            .astype(np.float32) for c in SIZES}


def peak_mask(intervals, chrom):
    """Bins of ``chrom`` overlapping any [s, e) by >= 1 bp, by brute force."""
    m = np.zeros(NB[chrom], bool)
    for c, s, e in intervals:
        if c == chrom:
            for i in range(NB[chrom]):
                if i * 25 < e and (i + 1) * 25 > s:
                    m[i] = True
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalgenome")
    rng = np.random.default_rng(0)
    shared = {a: {c: np.where(rng.random(NB[c]) < 0.05, rng.gamma(2, 3, NB[c]), 0.0)
                  for c in SIZES} for a in "AB"}
    (root / "truth" / "peaks").mkdir(parents=True)
    (root / "run" / "bigwig").mkdir(parents=True)
    (root / "annotation").mkdir()
    truth, imputed = {}, {}
    peaks_iv = [("chrA", 100, 130), ("chrA", 5000, 5025), ("chrA", 30000, 31000),
                ("chrB", 27400, 27510)]
    (root / "truth" / "peaks" / "c1@i1-A.bed").write_text(
        "".join(f"{c}\t{s}\t{e}\n" for c, s, e in peaks_iv))
    lines = ["cell_type\tassay\tpath\tpeaks\tindividual"]
    for cell, ind, assay in TRUTH:
        tid = f"{cell}@{ind}-{assay}"
        truth[tid] = signal(rng, shared[assay])
        imputed[tid] = {c: np.maximum(0, v + rng.normal(0, 0.7, len(v))).astype(np.float32)
                        for c, v in truth[tid].items()}
        write_bigwig(root / "truth" / f"{tid}.bigWig", truth[tid])
        write_bigwig(root / "run" / "bigwig" / f"{tid}.bigWig", imputed[tid])
        lines.append(f"{cell}\t{assay}\t{tid}.bigWig\t"
                     f"{'peaks/' + tid + '.bed' if assay == 'A' else ''}\t{ind}")
    (root / "truth" / "targets.tsv").write_text("\n".join(lines) + "\n")
    (root / "annotation" / "promoters.bed").write_text("chrA\t0\t2000\nchrB\t1000\t1500\n")
    (root / "chrom.sizes").write_text("".join(f"{c}\t{s}\n" for c, s in SIZES.items()))

    tracks = [Track(c, a, "x", s, i) for c, i, a, s in STORE_TRACKS]
    obs = {t.track_id: {c: np.arcsinh(signal(rng, shared[t.assay])[c].astype(np.float64))
                        .astype(np.float32) for c in SIZES} for t in tracks}
    spath = str(root / "store")
    grp = store_mod.create(spath, GENOME, tracks, chunk_bins=512, dtype="float32")
    for c in SIZES:
        grp["signal"][c][:] = np.stack([obs[t.track_id][c] for t in tracks], axis=1)
    store_mod.mark_complete(spath)
    return {"root": root, "truth": truth, "imputed": imputed, "obs": obs, "tracks": tracks,
            "peaks": {c: peak_mask(peaks_iv, c) for c in SIZES}, "store": spath,
            "promoter": {c: peak_mask([("chrA", 0, 2000), ("chrB", 1000, 1500)], c)
                         for c in SIZES}}


def cat(d):
    return np.concatenate([d[c] for c in SIZES])


def asinh32(d):
    return {c: np.arcsinh(v.astype(np.float64)).astype(np.float32) for c, v in d.items()}


def read_tsv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return rows


def test_end_to_end_with_baselines(tiny, capsys):
    root = tiny["root"]
    res = evaluate(str(root / "truth" / "targets.tsv"), str(root / "run" / "bigwig"),
                   store=tiny["store"], parallel=False)
    out = root / "run" / "evaluation"
    assert res["out"] == str(out)
    rows = read_tsv(out / "metrics.tsv")
    cols = list(rows[0])
    assert cols[:3 + len(METRICS)] == ["cell_type", "assay", "method", *METRICS]
    assert cols[3 + len(METRICS):] == ["mse_promoter", "individual"]
    doc = json.loads((out / "metrics.json").read_text())
    exact = {(r["cell_key"], r["assay"], r["method"]): r for r in doc["tracks"]}
    assert {(r["cell_type"], r["individual"], r["assay"], r["method"]) for r in rows} == {
        ("c1", "i1", "A", "model"), ("c1", "i1", "A", "AVG"), ("c1", "i1", "A", "TrackAVG"),
        ("c2", "i2", "B", "model"), ("c2", "i2", "B", "AVG"), ("c2", "i2", "B", "TrackAVG")}

    store_ids = [t.track_id for t in tiny["tracks"]]
    for cell, ind, assay in TRUTH:
        key, tid = f"{cell}@{ind}", f"{cell}@{ind}-{assay}"
        t = cat(asinh32(tiny["truth"][tid]))
        pval = cat(tiny["truth"][tid])
        peaks = cat(tiny["peaks"]) if assay == "A" else pval >= 2.0
        regions = {"promoter": cat(tiny["promoter"])}
        preds = {"model": cat(asinh32(tiny["imputed"][tid]))}
        # AVG: same assay, other cell keys, train/val only; TrackAVG: same cell type,
        # other individuals. Listed by hand from STORE_TRACKS.
        avg_ids = {"A": ["c1@i2-A", "c1@i3-A", "c2@i1-A"],
                   "B": ["c1@i1-B", "c2@i1-B", "c3@i2-B"]}[assay]
        track_ids = {"A": ["c1@i2-A", "c1@i3-A"], "B": ["c2@i1-B"]}[assay]
        assert all(i in store_ids for i in avg_ids + track_ids)
        for method, ids in (("AVG", avg_ids), ("TrackAVG", track_ids)):
            preds[method] = np.mean([cat(tiny["obs"][i]) for i in ids], axis=0,
                                    dtype=np.float64).astype(np.float32)
        for method, y in preds.items():
            want = reference(t, y, peaks, regions)
            assert_matches(exact[(key, assay, method)], want)
            tsv = next(r for r in rows if r["cell_type"] == cell and r["assay"] == assay
                       and r["method"] == method)
            for m, v in want.items():
                assert float(tsv[m]) == pytest.approx(v, rel=2e-5, abs=1e-9), (method, m)
            assert exact[(key, assay, method)]["n_bins"] == N

    summary = read_tsv(out / "summary.tsv")
    got = {(s["assay"], s["method"], s["metric"]): s for s in summary}
    model = [exact[(f"{c}@{i}", a, "model")] for c, i, a in TRUTH]
    avg = [exact[(f"{c}@{i}", a, "AVG")] for c, i, a in TRUTH]
    for m in ("mse", "gwcorr", "auprc"):
        assert float(got[("all", "model", m)]["mean"]) == pytest.approx(
            np.mean([r[m] for r in model]), rel=1e-5)
        better = [(a[m] < b[m]) if m == "mse" else (a[m] > b[m]) for a, b in zip(model, avg, strict=True)]
        assert float(got[("all", "AVG", m)]["model_beats"]) == pytest.approx(np.mean(better))
        assert got[("all", "AVG", m)]["n_paired"] == "2"
    assert got[("A", "TrackAVG", "mse")]["n"] == "1" and got[("all", "TrackAVG", "mse")]["n"] == "2"

    printed = capsys.readouterr().out
    assert "beats AVG" in printed and "TrackAVG" in printed
    for name in ("metrics_by_assay.png", "scatter_model_vs_AVG.png",
                 "scatter_model_vs_TrackAVG.png", "browser_c1@i1-A.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # A re-run with unchanged inputs reuses every result; a changed input is recomputed.
    evaluate(str(root / "truth" / "targets.tsv"), str(root / "run" / "bigwig"),
             store=tiny["store"], parallel=False, plots=False)
    assert "6 of 6 track evaluations reused" in capsys.readouterr().err


def test_person_specific_auprc_with_its_chance_level(tiny, tmp_path):
    """A ``person_peaks`` column adds ``auprc_person``: the average precision of those bins
    among all bins, for the model and the baselines alike, and ``person_frac``."""
    from edice_dist.metrics import metrics_from_arrays

    root = tiny["root"]
    iv = [("chrA", 2000, 2300), ("chrB", 900, 1100)]
    (tmp_path / "person.bed").write_text("".join(f"{c}\t{s}\t{e}\n" for c, s, e in iv))
    lines = (root / "truth" / "targets.tsv").read_text().splitlines()
    truth = root / "truth" / "targets_person.tsv"  # beside the other: same relative paths
    truth.write_text("\n".join([lines[0] + "\tperson_peaks",
                                lines[1] + f"\t{tmp_path / 'person.bed'}", lines[2] + "\t"]))
    res = evaluate(str(truth), str(root / "run" / "bigwig"), store=tiny["store"],
                   out=str(tmp_path / "ev"), parallel=False, plots=False, quiet=True)
    rows = {(r["track_id"], r["method"]): r for r in res["rows"]}
    t = cat(asinh32(tiny["truth"]["c1@i1-A"]))
    person = np.concatenate([peak_mask(iv, c) for c in SIZES])
    y = cat(asinh32(tiny["imputed"]["c1@i1-A"]))
    want = metrics_from_arrays(t, y, person)["auprc"]
    assert rows[("c1@i1-A", "model")]["auprc_person"] == pytest.approx(want, rel=1e-9)
    assert rows[("c1@i1-A", "TrackAVG")]["person_frac"] == pytest.approx(person.mean())
    assert "auprc_person" not in rows[("c2@i2-B", "model")]  # no person_peaks for it
    head = open(tmp_path / "ev" / "metrics.tsv").readline().split()
    assert head[-3:] == ["auprc_person", "person_frac", "individual"]
    beats = {(s["method"], s["metric"]): s["model_beats"] for s in res["summary"]
             if s["assay"] == "all"}
    assert beats[("TrackAVG", "person_frac")] is None  # a chance level, not a score


def test_pval_space_and_no_store(tiny, tmp_path):
    root = tiny["root"]
    out = tmp_path / "ev"
    res = evaluate(str(root / "truth" / "targets.tsv"), str(root / "run" / "bigwig"),
                   out=str(out), space="pval", plots=False, annotation="", parallel=False)
    assert {r["method"] for r in res["rows"]} == {"model"}
    doc = json.loads((out / "metrics.json").read_text())
    for r in doc["tracks"]:
        tid = r["track_id"]
        t, y = cat(tiny["truth"][tid]), cat(tiny["imputed"][tid])
        peaks = cat(tiny["peaks"]) if r["assay"] == "A" else t >= 2.0
        assert_matches(r, reference(t, y, peaks))
        assert "mse_promoter" not in r


def test_parallel_ray_equals_sequential(tiny, tmp_path, ray_local):
    root = tiny["root"]
    kw = dict(store=tiny["store"], plots=False)
    a = evaluate(str(root / "truth" / "targets.tsv"), str(root / "run" / "bigwig"),
                 out=str(tmp_path / "seq"), parallel=False, **kw)
    b = evaluate(str(root / "truth" / "targets.tsv"), str(root / "run" / "bigwig"),
                 out=str(tmp_path / "par"), parallel=True, **kw)
    assert (tmp_path / "seq" / "metrics.tsv").read_text() == (tmp_path / "par" / "metrics.tsv").read_text()
    assert len(a["rows"]) == len(b["rows"]) == 6


def test_missing_imputed_file_names_the_track(tiny, tmp_path):
    root = tiny["root"]
    bw = tmp_path / "bw"
    bw.mkdir()
    (bw / "c1@i1-A.bigWig").write_bytes((root / "run" / "bigwig" / "c1@i1-A.bigWig").read_bytes())
    with pytest.raises(InputError, match=r"c2@i2-B.*expected .*bw/c2@i2-B\.bigWig"):
        evaluate(str(root / "truth" / "targets.tsv"), str(bw), plots=False)


def test_imputed_bigwig_of_another_genome_is_rejected(tiny, tmp_path):
    root = tiny["root"]
    bw_dir = tmp_path / "bw"
    bw_dir.mkdir()
    (bw_dir / "c2@i2-B.bigWig").write_bytes((root / "run" / "bigwig" / "c2@i2-B.bigWig").read_bytes())
    short = pyBigWig.open(str(bw_dir / "c1@i1-A.bigWig"), "w")
    short.addHeader([("chrA", SIZES["chrA"])], maxZooms=0)
    short.addEntries("chrA", 0, values=[1.0] * 10, span=25, step=25)
    short.close()
    with pytest.raises(InputError, match="no chromosome chrB"):
        evaluate(str(root / "truth" / "targets.tsv"), str(bw_dir), plots=False)


def test_constant_imputation_gives_nan_correlation_and_counts(tiny, tmp_path):
    root = tiny["root"]
    bw_dir = tmp_path / "bw"
    bw_dir.mkdir()
    for cell, ind, assay in TRUTH:
        write_bigwig(bw_dir / f"{cell}@{ind}-{assay}.bigWig",
                     {c: np.full(NB[c], 1.5, np.float32) for c in SIZES})
    res = evaluate(str(root / "truth" / "targets.tsv"), str(bw_dir), plots=True,
                   parallel=False, out=str(tmp_path / "ev"))
    assert all(np.isnan(r["gwcorr"]) and np.isnan(r["gwspear"]) for r in res["rows"])
    s = {(x["assay"], x["metric"]): x for x in res["summary"] if x["method"] == "model"}
    assert s[("all", "gwcorr")]["n"] == 0 and np.isnan(s[("all", "gwcorr")]["mean"])
    assert s[("all", "mse")]["n"] == 2
    assert read_tsv(tmp_path / "ev" / "metrics.tsv")[0]["gwcorr"] == "nan"


def test_avg_baseline_is_the_numpy_mean_of_the_other_cells(tiny):
    root = tiny["root"]
    truth = read_truth(str(root / "truth" / "targets.tsv"))
    preds = imputed_paths(str(root / "run" / "bigwig"), truth)
    jobs = plan_jobs(truth, preds, GENOME, "pval", store_mod.open_store(tiny["store"]),
                     read_bins=700)
    job = next(j for j in jobs if j.method == "AVG" and j.track.assay == "A")
    got = np.concatenate([y for _, y, *_ in job_chunks(job)])
    ids = ["c1@i2-A", "c1@i3-A", "c2@i1-A"]  # same assay, other cells, train/val only
    want = np.mean([np.sinh(cat(tiny["obs"][i]).astype(np.float64)) for i in ids], axis=0)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)


def test_imputed_manifest_with_arcsinh_values(tiny, tmp_path):
    """A manifest.tsv in the imputed folder names the files and their value space."""
    root = tiny["root"]
    d = tmp_path / "bw"
    d.mkdir()
    rows = ["cell_type\tassay\tindividual\tpath\tspace"]
    for cell, ind, assay in TRUTH:
        tid = f"{cell}@{ind}-{assay}"
        write_bigwig(d / f"x{tid}.bw", asinh32(tiny["imputed"][tid]))
        rows.append(f"{cell}\t{assay}\t{ind}\tx{tid}.bw\tarcsinh")
    (d / "manifest.tsv").write_text("\n".join(rows) + "\n")
    res = evaluate(str(root / "truth" / "targets.tsv"), str(d), plots=False, annotation="",
                   parallel=False, out=str(tmp_path / "ev"))
    for r in res["rows"]:
        tid = r["track_id"]
        t, y = cat(asinh32(tiny["truth"][tid])), cat(asinh32(tiny["imputed"][tid]))
        peaks = cat(tiny["peaks"]) if r["assay"] == "A" else cat(tiny["truth"][tid]) >= 2.0
        assert_matches(r, reference(t, y, peaks), rtol=1e-6)


def test_baselines_read_each_store_chunk_once_and_leave_nothing(tiny, tmp_path, monkeypatch):
    """AVG and TrackAVG of every truth track come from one pass over the store: each
    chunk of all tracks decoded once, not once per truth track and method (at a
    consortium's 2,000 targets that was 2,000 reads of the store); the averaged values
    are the numpy means of the chosen columns, and the averages are removed afterwards."""
    reads = []
    real = store_mod.TrackStore.read

    def counting(self, chrom, start, stop, columns=None, dtype=np.float32):
        reads.append((chrom, start, stop))
        return real(self, chrom, start, stop, columns, dtype)

    monkeypatch.setattr(store_mod.TrackStore, "read", counting)
    root = tiny["root"]
    out = tmp_path / "ev"
    res = evaluate(str(root / "truth" / "targets.tsv"), str(root / "run" / "bigwig"),
                   store=tiny["store"], out=str(out), parallel=False, plots=False)
    n_chunks = sum(-(-NB[c] // 512) for c in SIZES)
    assert len(reads) == n_chunks == len(set(reads))  # 4 baseline jobs, one pass
    assert not (out / "_baselines").exists()
    rows = {(r["cell_key"], r["method"]): r for r in res["rows"]}
    # TrackAVG of c2@i2-B: the one other individual's c2 B track, so its MSE against the
    # truth is that track's, computed here from the fixture's arrays.
    t = cat(asinh32(tiny["truth"]["c2@i2-B"]))
    y = cat(tiny["obs"]["c2@i1-B"]).astype(np.float64)
    assert rows[("c2@i2", "TrackAVG")]["mse"] == pytest.approx(np.mean((t - y) ** 2), rel=1e-5)


def test_baselines_of_chunks_longer_than_one_read(tmp_path, monkeypatch):
    """Store chunks longer than ``baselines.READ_BINS`` are averaged part by part: every
    bin of every chromosome, short last chunks included, equals numpy's mean of the
    chosen columns (in both spaces)."""
    from trainstore import make_store

    from edice_dist import baselines

    st, truth = make_store(str(tmp_path / "store"), n_cells=3, n_assays=2,
                           chrom_bins=(5000, 1300), chunk_bins=4096)
    assert st.block_bins == 1024
    monkeypatch.setattr(baselines, "READ_BINS", 2048)  # 2 reads per full chunk
    groups = [(0, 2, 4), (1, 5)]
    for space in ("arcsinh", "pval"):
        path = baselines.compute(st, groups, str(tmp_path / space), space, parallel=False)
        grp = baselines.open_group(path)
        for chrom, vals in truth.items():
            key, n = st.array_key(chrom), len(vals)
            stored = st.read(chrom, 0, n)  # the store's float16 rounding, as the jobs see it
            for g, cols in enumerate(groups):
                x = stored[:, list(cols)].astype(np.float64)
                want = (np.sinh(x) if space == "pval" else x).mean(axis=1)
                np.testing.assert_allclose(baselines.read(grp, key, g, 0, n), want,
                                           rtol=1e-5, atol=1e-6)
