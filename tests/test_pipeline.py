"""The README's main command, end to end, checked against independent computations:
the bigWigs and the truth are read with pyBigWig and scored with numpy and sklearn."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pyBigWig
import pytest
from sklearn.metrics import average_precision_score

pytestmark = pytest.mark.slow


def _binned(path: str, chroms: list[tuple[str, int]]) -> np.ndarray:
    """-log10 p in 25 bp bins over the genome: per-base values, gaps as 0, means per bin
    (the last partial bin over its real bases)."""
    out = []
    with pyBigWig.open(path) as bw:
        for chrom, size in chroms:
            v = np.nan_to_num(np.asarray(bw.values(chrom, 0, size, numpy=True), dtype=np.float64))
            nb = -(-size // 25)
            pad = np.zeros(nb * 25)
            pad[:size] = v
            counts = np.full(nb, 25.0)
            counts[-1] = size - (nb - 1) * 25
            out.append(pad.reshape(nb, 25).sum(1) / counts)
    return np.concatenate(out)


def _peak_mask(bed: str, chroms: list[tuple[str, int]]) -> np.ndarray:
    masks = {c: np.zeros(-(-s // 25), dtype=bool) for c, s in chroms}
    with open(bed) as f:
        for line in f:
            c, s, e = line.split()[:3]
            if c in masks:
                masks[c][int(s) // 25: -(-int(e) // 25)] = True
    return np.concatenate([masks[c] for c, _ in chroms])


def _tsv(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_readme_main_command_runs_everything_and_beats_avg(tmp_path):
    """`bash scripts/demo.sh` runs `edice benchmark-quality demo`: run it with a relative
    output folder, then score its bigWigs ourselves."""
    env = {**os.environ, "EDICE_RAY_DASHBOARD": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "edice_dist", "benchmark-quality", "demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    demo = tmp_path / "demo"
    bigwig_dir = demo / "run" / "bigwig"
    assert f"bigWigs:      {bigwig_dir}" in log
    assert "beats AVG" in proc.stdout and "metrics.tsv" in log

    sim = demo / "consortium"
    chroms = [(ln.split()[0], int(ln.split()[1])) for ln in open(sim / "chrom.sizes")]
    observed = _tsv(str(sim / "manifest.tsv"))
    truth = _tsv(str(sim / "truth" / "targets.tsv"))
    assert truth, "the simulation holds out truth tracks"

    scores = {"model": {"mse": [], "corr": [], "auprc": []},
              "AVG": {"mse": [], "corr": [], "auprc": []}}
    for t in truth:
        y = np.arcsinh(_binned(str(sim / "truth" / t["path"]), chroms))
        imp = np.arcsinh(_binned(str(bigwig_dir / f"{t['cell_type']}-{t['assay']}.bigWig"),
                                 chroms))
        others = [r for r in observed if r["assay"] == t["assay"] and r["cell_type"] != t["cell_type"]]
        avg = np.mean([np.arcsinh(_binned(str(sim / r["path"]), chroms)) for r in others], axis=0)
        peaks = _peak_mask(str(sim / "truth" / t["peaks"]), chroms)
        for name, pred in (("model", imp), ("AVG", avg)):
            scores[name]["mse"].append(np.mean((y - pred) ** 2))
            scores[name]["corr"].append(np.corrcoef(y, pred)[0, 1])
            if peaks.any():
                scores[name]["auprc"].append(average_precision_score(peaks, pred))

    model = {k: np.mean(v) for k, v in scores["model"].items()}
    avg = {k: np.mean(v) for k, v in scores["AVG"].items()}
    assert model["mse"] < avg["mse"], (model, avg)
    assert model["corr"] > avg["corr"], (model, avg)
    assert model["auprc"] > avg["auprc"], (model, avg)

    # The evaluation's own table agrees with this independent scoring.
    rows = {(r["cell_type"], r["assay"], r["method"]): r for r in _tsv(str(demo / "evaluation" / "metrics.tsv"))}
    for i, t in enumerate(truth):
        r = rows[(t["cell_type"], t["assay"], "model")]
        assert float(r["mse"]) == pytest.approx(scores["model"]["mse"][i], rel=1e-3, abs=1e-4)
        assert float(r["gwcorr"]) == pytest.approx(scores["model"]["corr"][i], abs=1e-3)
