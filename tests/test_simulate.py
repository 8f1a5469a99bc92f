"""`edice simulate`: files, encodings, determinism, truth and the structure in the signal.

Every check reads the written files back (pyBigWig, plain text) and computes its
statistics with numpy/scipy, independently of the simulator's code.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import sys

import numpy as np
import pyBigWig
import pytest

from edice_dist import cli
from edice_dist.errors import InputError
from edice_dist.genome import read_chrom_sizes
from edice_dist.simulate import SimConfig, neglog10_poisson_sf, simulate
from edice_dist.tracks import read_manifest

SMALL = "chrA:300013,chrB:90007"
BIG_ENOUGH = "chr1:600011,chr2:400019"


def _sim(tmp_path_factory, name, **kw):
    out = str(tmp_path_factory.mktemp(name) / "sim")
    simulate(out, SimConfig(**kw))
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _sim(tmp_path_factory, "small", seed=3, chrom_sizes=SMALL)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every (cell, assay) measured: for shape and tissue statistics."""
    return _sim(tmp_path_factory, "full", seed=5, chrom_sizes=BIG_ENOUGH, core_fraction=1.0,
                other_fraction=1.0, n_cell_types=9)


@pytest.fixture(scope="module")
def full_tracks(full):
    return _all_tracks(full)


@pytest.fixture(scope="module")
def indiv(tmp_path_factory):
    return _sim(tmp_path_factory, "indiv", seed=2, chrom_sizes=BIG_ENOUGH, individuals=3,
                n_cell_types=6, individual_cell_fraction=0.8, private_rate=40.0)


# ---- independent readers ----------------------------------------------------------------


def _sizes(out):
    return dict(line.split() for line in open(os.path.join(out, "chrom.sizes")))


def _binned(path, sizes):
    """25 bp means of a bigWig or bedGraph, missing data as 0: {chrom: (n_bins,)}."""
    out = {}
    if path.endswith(".bedGraph"):
        per = {c: np.zeros(int(s)) for c, s in sizes.items()}
        for line in open(path):
            c, s, e, v = line.split()
            per[c][int(s):int(e)] = float(v)
        vals = per
    else:
        bw = pyBigWig.open(path)
        vals = {c: np.nan_to_num(bw.values(c, 0, int(s), numpy=True)) for c, s in sizes.items()}
        bw.close()
    for c, s in sizes.items():
        s = int(s)
        nb = math.ceil(s / 25)
        v = np.concatenate([vals[c], np.zeros(nb * 25 - s)])
        out[c] = v.reshape(nb, 25).sum(1) / np.minimum(25, s - 25 * np.arange(nb))
    return out


def _genome_vec(path, sizes):
    b = _binned(path, sizes)
    return np.concatenate([b[c] for c in sizes])


def _rows(path):
    return list(csv.DictReader(open(path), delimiter="\t"))


def _key(r):
    return (r["cell_type"] + ("@" + r["individual"] if r.get("individual") else ""), r["assay"])


def _all_tracks(out):
    """{(cell_key, assay): arcsinh genome vector} of observed and truth tracks."""
    sizes = _sizes(out)
    d = {}
    for t in read_manifest(os.path.join(out, "manifest.tsv")):
        d[(t.cell_key, t.assay)] = np.arcsinh(_genome_vec(t.path, sizes))
    for r in _rows(os.path.join(out, "truth", "targets.tsv")):
        d[_key(r)] = np.arcsinh(_genome_vec(os.path.join(out, "truth", r["path"]), sizes))
    return d


def _peak_mask(bed, sizes):
    offs, off = {}, 0
    for c, s in sizes.items():
        offs[c] = off
        off += math.ceil(int(s) / 25)
    m = np.zeros(off, dtype=bool)
    for line in open(bed):
        c, s, e = line.split()[:3]
        m[offs[c] + int(s) // 25: offs[c] + math.ceil(int(e) / 25)] = True
    return m


# ---- files -------------------------------------------------------------------------------


def test_files_manifest_and_config(small):
    for rel in ("chrom.sizes", "manifest.tsv", "simulation.json", "truth/targets.tsv",
                "annotation/promoters.bed", "annotation/gene_bodies.bed",
                "annotation/enhancers.bed"):
        assert os.path.isfile(os.path.join(small, rel)), rel
    assert not os.path.exists(small + ".partial")
    g = read_chrom_sizes(os.path.join(small, "chrom.sizes"))
    assert dict(zip(g.chroms, g.sizes, strict=True)) == {"chrA": 300013, "chrB": 90007}
    tracks = read_manifest(os.path.join(small, "manifest.tsv"))
    assert tracks and all(os.path.isfile(t.path) and t.split == "train" for t in tracks)
    header = open(os.path.join(small, "manifest.tsv")).readline().split()
    assert header == ["cell_type", "assay", "path", "split"]
    assert all(r["path"].startswith("bigwig/") for r in _rows(os.path.join(small, "manifest.tsv")))
    meta = json.load(open(os.path.join(small, "simulation.json")))
    assert meta["config"]["seed"] == 3 and meta["config"]["chrom_sizes"] == SMALL
    # Roadmap-like sparsity: core marks in most cells, the others rarer
    cells = {t.cell_type for t in tracks}
    per_assay = {a: sum(t.assay == a for t in tracks) for a in {t.assay for t in tracks}}
    targets = _rows(os.path.join(small, "truth", "targets.tsv"))
    for r in targets:
        per_assay[r["assay"]] = per_assay.get(r["assay"], 0) + 1
    core = np.mean([per_assay.get(a, 0) for a in ("H3K4me3", "H3K4me1", "H3K36me3",
                                                   "H3K27me3", "H3K9me3")])
    other = np.mean([per_assay.get(a, 0) for a in ("H3K27ac", "DNase", "H3K9ac")])
    assert core > 0.75 * len(cells) and other < core


def test_bigwig_headers_and_values(small):
    sizes = {c: int(s) for c, s in _sizes(small).items()}
    paths = [t.path for t in read_manifest(os.path.join(small, "manifest.tsv"))]
    paths += [os.path.join(small, "truth", r["path"])
              for r in _rows(os.path.join(small, "truth", "targets.tsv"))]
    spans = set()
    for p in paths:
        bw = pyBigWig.open(p)
        assert bw.chroms() == sizes, p
        for c, s in sizes.items():
            iv = np.array(bw.intervals(c), dtype=np.float64).reshape(-1, 3)
            assert len(iv), (p, c)
            assert iv[:, 0].min() >= 0 and iv[:, 1].max() <= s, (p, c)
            assert np.all(iv[1:, 0] >= iv[:-1, 1]), (p, c)  # sorted, no overlap
            assert np.isfinite(iv[:, 2]).all() and (iv[:, 2] >= 0).all(), (p, c)
            spans.update(np.unique(iv[:, 1] - iv[:, 0]).tolist())
        bw.close()
    assert {25.0, 300013 % 25, 90007 % 25} <= spans  # fixed steps and clipped last bins
    assert max(spans) > 25  # some variable-width runs


def test_encodings_hold_the_same_values(tmp_path):
    """Fixed steps, variable-width runs (zeros left out) and bedGraph are encodings of the
    same 25 bp values."""
    base = dict(seed=4, chrom_sizes="c1:100007", n_cell_types=4, n_test=2)
    outs = {}
    for name, kw in {"fixed": dict(variable_fraction=0.0), "var": dict(variable_fraction=1.0),
                     "bg": dict(source_formats="bedgraph")}.items():
        outs[name] = str(tmp_path / name)
        simulate(outs[name], SimConfig(**base, **kw))
    sizes = _sizes(outs["fixed"])
    m = {k: {(t.cell_key, t.assay): t.path for t in read_manifest(os.path.join(v, "manifest.tsv"))}
         for k, v in outs.items()}
    assert m["fixed"].keys() == m["var"].keys() == m["bg"].keys()
    assert all(p.endswith(".bedGraph") for p in m["bg"].values())
    n_runs = 0
    for key, p in m["fixed"].items():
        ref = _genome_vec(p, sizes)
        np.testing.assert_array_equal(_genome_vec(m["var"][key], sizes), ref)
        np.testing.assert_allclose(_genome_vec(m["bg"][key], sizes), ref, rtol=1e-5, atol=1e-6)
        bw = pyBigWig.open(m["var"][key])
        iv = np.array(bw.intervals("c1"))
        n_runs += len(iv)
        assert iv[-1, 1] <= 100007
    assert n_runs < len(m["fixed"]) * math.ceil(100007 / 25)


def test_same_seed_same_values_any_workers_other_seed_differs(tmp_path):
    base = dict(chrom_sizes="c1:80011,c2:30003", n_cell_types=4, n_test=2)
    a, b, c = (str(tmp_path / x) for x in "abc")
    simulate(a, SimConfig(seed=7, **base))
    simulate(b, SimConfig(seed=7, workers=2, **base))
    simulate(c, SimConfig(seed=8, **base))
    sizes = _sizes(a)
    ta = read_manifest(os.path.join(a, "manifest.tsv"))
    tb = read_manifest(os.path.join(b, "manifest.tsv"))
    assert [(t.cell_key, t.assay) for t in ta] == [(t.cell_key, t.assay) for t in tb]
    for x, y in zip(ta, tb, strict=True):
        for chrom in sizes:
            bx, by = pyBigWig.open(x.path), pyBigWig.open(y.path)
            assert bx.intervals(chrom) == by.intervals(chrom)
    assert open(os.path.join(a, "truth", "targets.tsv")).read() == \
        open(os.path.join(b, "truth", "targets.tsv")).read()
    tc = {(t.cell_key, t.assay): t.path for t in read_manifest(os.path.join(c, "manifest.tsv"))}
    shared = [t for t in ta if (t.cell_key, t.assay) in tc]
    assert shared
    for t in shared:
        assert not np.array_equal(_genome_vec(t.path, sizes),
                                  _genome_vec(tc[(t.cell_key, t.assay)], sizes))


def test_held_out_truth_and_vocabulary(small):
    obs = {(t.cell_key, t.assay) for t in read_manifest(os.path.join(small, "manifest.tsv"))}
    targets = _rows(os.path.join(small, "truth", "targets.tsv"))
    assert len(targets) == 8
    assert list(targets[0]) == ["cell_type", "assay", "path", "peaks"]
    for r in targets:
        k = _key(r)
        assert k not in obs
        assert sum(c == k[0] for c, _ in obs) >= 2  # the cell is in the vocabulary
        assert sum(a == k[1] for _, a in obs) >= 2  # the assay too, AVG is defined
        assert os.path.isfile(os.path.join(small, "truth", r["path"]))
        assert os.path.isfile(os.path.join(small, "truth", r["peaks"]))
    cells = {c for c, _ in obs}
    for c in cells:
        assert sum(cc == c for cc, _ in obs) >= 2


def test_peaks_inside_chromosomes_and_enriched(small):
    sizes = _sizes(small)
    with_peaks = 0
    for r in _rows(os.path.join(small, "truth", "targets.tsv")):
        bed = os.path.join(small, "truth", r["peaks"])
        rows = [line.split() for line in open(bed)]
        if not rows:  # a rare mark may have no domain in a tiny genome
            continue
        with_peaks += 1
        last = {}
        for c, s, e in rows:
            s, e = int(s), int(e)
            assert 0 <= s < e <= int(sizes[c])
            assert s >= last.get(c, -1)  # sorted, merged: no touching intervals
            last[c] = e + 1
        y = np.arcsinh(_genome_vec(os.path.join(small, "truth", r["path"]), sizes))
        m = _peak_mask(bed, sizes)
        assert 0 < m.mean() < 0.5
        assert y[m].mean() > y[~m].mean() + 0.5, r
    assert with_peaks >= 6


def test_annotation_beds(small):
    sizes = _sizes(small)
    for name in ("promoters", "gene_bodies", "enhancers"):
        rows = [line.split("\t") for line in open(os.path.join(small, "annotation", name + ".bed"))]
        assert len(rows) > 3, name
        starts = {}
        for r in rows:
            c, s, e = r[0], int(r[1]), int(r[2])
            assert 0 <= s < e <= int(sizes[c])
            assert s >= starts.get(c, 0)
            starts[c] = s


def _acf(x, lag):
    x = x - x.mean()
    return float((x[:-lag] * x[lag:]).mean() / (x * x).mean())


def test_assay_shapes_differ(full_tracks):
    d = full_tracks

    def acf(assay):
        return np.mean([_acf(v, 200) for (_, a), v in d.items() if a == assay])

    broad = [acf(a) for a in ("H3K27me3", "H3K9me3", "H3K36me3")]
    narrow = [acf(a) for a in ("H3K4me3", "DNase")]
    assert min(broad) > max(narrow) + 0.1, (broad, narrow)


def test_tissue_groups_differ(full_tracks):
    d = full_tracks
    for a in sorted({a for _, a in d}):
        cells = sorted(c for c, aa in d if aa == a)
        within, across = [], []
        for c1, c2 in itertools.combinations(cells, 2):
            r = np.corrcoef(d[(c1, a)], d[(c2, a)])[0, 1]
            # cell types are named <tissue>_<n>
            (within if c1.split("_")[0] == c2.split("_")[0] else across).append(r)
        # heterochromatin is partly constitutive: few domains in a small genome may all be
        margin = -0.05 if a == "H3K9me3" else 0.05
        assert np.mean(within) > np.mean(across) + margin, (a, np.mean(within), np.mean(across))


def test_cell_specific_signal_is_predictable(full, full_tracks):
    """The other assays of the same cell tell which elements are on in it: a ridge
    regression from them (and AVG), fitted on the other cells, beats the AVG baseline."""
    from sklearn.linear_model import Ridge

    obs = dict(full_tracks)
    targets = [_key(r) for r in _rows(os.path.join(full, "truth", "targets.tsv"))]
    for k in targets:
        obs.pop(k)

    def smooth(x):
        return np.convolve(x, np.ones(9) / 9, mode="same")

    def features(c, a, assays):
        avg = np.mean([v for (cc, aa), v in obs.items() if aa == a and cc != c], axis=0)
        return np.stack([avg] + [obs[(c, b)] for b in assays]
                        + [smooth(obs[(c, b)]) for b in assays], axis=1)

    gains = []
    for c, a in targets:
        y = full_tracks[(c, a)]
        assays = [b for cc, b in obs if cc == c]
        train = [cc for cc, aa in obs if aa == a and all((cc, b) in obs for b in assays)]
        assert train, (c, a)
        model = Ridge(alpha=1.0).fit(np.concatenate([features(cc, a, assays) for cc in train]),
                                     np.concatenate([obs[(cc, a)] for cc in train]))
        x = features(c, a, assays)
        gains.append(np.mean((x[:, 0] - y) ** 2) - np.mean((model.predict(x) - y) ** 2))
    gains = np.array(gains)
    assert gains.mean() > 0.05 and (gains > 0).mean() >= 0.6 and gains.min() > -0.1, gains


def test_individuals_and_private_elements(indiv):
    man = _rows(os.path.join(indiv, "manifest.tsv"))
    assert list(man[0]) == ["cell_type", "assay", "path", "split", "individual"]
    targets = _rows(os.path.join(indiv, "truth", "targets.tsv"))
    assert list(targets[0]) == ["cell_type", "assay", "path", "peaks", "individual",
                                "person_peaks"]
    inds = sorted({r["individual"] for r in man})
    assert inds == ["ind01", "ind02", "ind03"]
    obs = {(r["cell_type"], r["individual"], r["assay"]) for r in man}
    for r in targets:  # TrackAVG is defined: the same track exists in another individual
        assert any((r["cell_type"], i, r["assay"]) in obs for i in inds if i != r["individual"])
        assert (r["cell_type"], r["individual"], r["assay"]) not in obs
    tracks = read_manifest(os.path.join(indiv, "manifest.tsv"))
    assert all("@" in os.path.basename(t.path) for t in tracks)

    sizes = _sizes(indiv)
    offs, off = {}, 0
    for c, s in sizes.items():
        offs[c] = off
        off += math.ceil(int(s) / 25)
    private = {i: np.zeros(off, dtype=bool) for i in inds}
    for line in open(os.path.join(indiv, "annotation", "private_elements.bed")):
        c, s, e, who, kind = line.split()
        assert kind in ("promoter", "enhancer") and who in inds
        private[who][offs[c] + int(s) // 25: offs[c] + math.ceil(int(e) / 25)] = True
    assert all(m.any() for m in private.values())
    # An individual's tracks are higher on its own private elements than the same cell
    # type and assay of the other individuals.
    vec = {(t.cell_type, t.individual, t.assay): np.arcsinh(_genome_vec(t.path, sizes))
           for t in tracks if t.assay in ("H3K4me1", "H3K4me3", "H3K27ac", "DNase")}
    diffs = []
    for (c, i, a), v in vec.items():
        m = private[i] & ~np.any([private[j] for j in inds if j != i], axis=0)
        for j in inds:
            if j != i and (c, j, a) in vec:
                diffs.append(v[m].mean() - vec[(c, j, a)][m].mean())
    assert len(diffs) >= 5 and np.mean(diffs) > 0.2 and np.mean(np.array(diffs) > 0) > 0.8


def test_person_specific_peaks(indiv):
    """With individuals every track has its peaks, and its person-specific peaks are
    peaks of its own that no other individual's track of that cell type and assay has,
    in runs >= 150 bp; observed.tsv lists the observed tracks with both."""
    sizes = _sizes(indiv)
    truth = os.path.join(indiv, "truth")
    obs = _rows(os.path.join(truth, "observed.tsv"))
    man = _rows(os.path.join(indiv, "manifest.tsv"))
    assert list(obs[0]) == ["cell_type", "assay", "path", "peaks", "individual", "person_peaks"]
    assert sorted(map(_key, obs)) == sorted(map(_key, man))
    rows = obs + _rows(os.path.join(truth, "targets.tsv"))
    peaks = {_key(r): _peak_mask(os.path.join(truth, r["peaks"]), sizes) for r in rows}
    assert all(os.path.exists(os.path.normpath(os.path.join(truth, r["path"]))) for r in obs)
    found = 0
    for r in rows:
        others = [k for k in peaks if k[1] == r["assay"] and k[0] != _key(r)[0]
                  and k[0].split("@")[0] == r["cell_type"]]
        if not others:
            assert r["person_peaks"] == ""
            continue
        q = _peak_mask(os.path.join(truth, r["person_peaks"]), sizes)
        assert not (q & ~peaks[_key(r)]).any()
        assert not any((q & peaks[k]).any() for k in others)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], q.astype(np.int8), [0]))))
        assert (np.diff(edges)[::2] >= 6).all()  # runs of >= 150 bp
        found += int(q.sum() > 0)
    assert found >= len(rows) // 2  # private elements and flips make them common


def test_poisson_table_matches_scipy():
    from scipy.stats import poisson

    lams = np.array([0.3, 1.0, 4.0, 17.5, 60.0])
    t = neglog10_poisson_sf(lams, 400)
    k = np.arange(401)
    for i, lam in enumerate(lams):
        ref = -poisson.logsf(k - 1, lam) / math.log(10)
        ok = np.isfinite(ref)
        np.testing.assert_allclose(t[i, ok], np.maximum(ref[ok], 0), rtol=1e-4, atol=1e-5)
    assert np.isfinite(t).all() and (t >= 0).all()
    assert np.all(np.diff(t, axis=1) >= -1e-6)  # rarer counts, smaller p


def test_overrides_and_bad_keys():
    cfg = SimConfig.from_overrides({"seed": "5", "individuals": "0", "genome_bp": "2_000_000",
                                    "n_chroms": "2", "force": "true", "depth": "2.5"})
    assert cfg.seed == 5 and cfg.force is True and cfg.depth == 2.5
    g = cfg.genome()
    assert len(g.chroms) == 2 and abs(sum(g.sizes) - 2_000_000) < 100
    assert all(s % 25 for s in g.sizes)
    assert SimConfig.from_overrides({"chrom-sizes": "x:1000"}).genome().size == {"x": 1000}
    with pytest.raises(InputError, match="n_cell_types"):
        SimConfig.from_overrides({"bogus": "1"})
    with pytest.raises(InputError, match="not a valid int"):
        SimConfig.from_overrides({"seed": "abc"})
    with pytest.raises(InputError, match="individuals"):
        SimConfig(individuals=1)
    with pytest.raises(InputError, match="chrom_sizes"):
        SimConfig(chrom_sizes="chr1:0")
    with pytest.raises(InputError, match="n_test"):
        from edice_dist.simulate import make_plan

        make_plan(SimConfig(n_cell_types=3, n_test=40))


def test_rerun_is_a_noop_other_config_needs_force(tmp_path, capsys):
    out = str(tmp_path / "sim")
    cfg = dict(seed=1, chrom_sizes="c1:50009", n_cell_types=4, n_test=2)
    assert not simulate(out, SimConfig(**cfg))["skipped"]
    stamp = os.path.getmtime(os.path.join(out, "manifest.tsv"))
    assert simulate(out, SimConfig(**cfg, workers=2))["skipped"]
    assert os.path.getmtime(os.path.join(out, "manifest.tsv")) == stamp
    with pytest.raises(InputError, match="another config"):
        simulate(out, SimConfig(**{**cfg, "seed": 2}))
    assert not simulate(out, SimConfig(**{**cfg, "seed": 2}, force=True))["skipped"]
    assert json.load(open(os.path.join(out, "simulation.json")))["config"]["seed"] == 2
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InputError, match="not a simulation"):
        simulate(str(other), SimConfig(**cfg))


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "sim")
    assert cli.main(["simulate", out, "--seed", "2", "--chrom_sizes=c1:40001",
                     "--n_cell_types=4", "--n_test=2"]) == 0
    assert len(read_manifest(os.path.join(out, "manifest.tsv"))) >= 8
    assert "observed tracks" in capsys.readouterr().err
    assert cli.main(["simulate", str(tmp_path / "x"), "--nope=1"]) == 1
    assert "Valid settings" in capsys.readouterr().err


def test_simulate_to_s3(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    from s3server import S3Server, clear_fsspec_cache

    with S3Server(bucket="edice-sim") as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        clear_fsspec_cache()
        try:
            cfg = SimConfig(seed=1, chrom_sizes="c1:30011", n_cell_types=3, n_test=1)
            url = s3.url("runs", "sim")
            assert not simulate(url, cfg)["skipped"]
            keys = s3.keys("runs/")
            assert "runs/sim/manifest.tsv" in keys and "runs/sim/simulation.json" in keys
            assert not any(".partial" in k for k in keys)
            local = str(tmp_path / "sim")
            simulate(local, cfg)
            rel = sorted(os.path.relpath(os.path.join(d, f), local)
                         for d, _, fs in os.walk(local) for f in fs)
            assert sorted(k[len("runs/sim/"):] for k in keys) == rel
            body = s3.client().get_object(Bucket="edice-sim", Key="runs/sim/manifest.tsv")
            assert body["Body"].read().decode() == open(os.path.join(local, "manifest.tsv")).read()
            assert simulate(url, cfg)["skipped"]
        finally:
            clear_fsspec_cache()
