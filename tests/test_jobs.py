"""Job entry points (jobs/*.py) and their config files: loading, the preflight check that
fails fast and clearly before any work, the mapping of config keys onto the stages, and
an end-to-end `ray job submit` to a real local Ray head node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from edice_dist.errors import EdiceError, InputError
from edice_dist.jobconfig import load_job_config, run_stages, stages_for
from edice_dist.preflight import preflight

sys.path.insert(0, str(Path(__file__).parent))
from rayhead import RayHead  # noqa: E402
from s3server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture
def inputs(tmp_path):
    """A manifest of two (placeholder) bigWigs and a chrom.sizes file; preflight checks
    existence and parses the manifest and sizes, it does not read the bigWigs."""
    d = tmp_path / "in"
    (d / "bw").mkdir(parents=True)
    for name in ("A-H3K4me3.bigWig", "B-H3K27ac.bigWig"):
        (d / "bw" / name).write_bytes(b"placeholder")
    (d / "manifest.tsv").write_text(
        "cell_type\tassay\tpath\n"
        "A\tH3K4me3\tbw/A-H3K4me3.bigWig\n"
        "B\tH3K27ac\tbw/B-H3K27ac.bigWig\n")
    (d / "chrom.sizes").write_text("chr1\t100000\nchr2\t50000\n")
    return d


def _write(path: Path, cfg: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(cfg))
    else:
        path.write_text(yaml.safe_dump(cfg))
    return str(path)


# ------------------------------------------------------------------ loading


def test_load_resolves_paths_and_defaults(tmp_path, inputs):
    path = _write(tmp_path / "cfg" / "job.yaml", {
        "out": "../results",  # relative to the config file's folder
        "manifest": str(inputs / "manifest.tsv"),
        "chrom_sizes": "s3://bucket/hg38.chrom.sizes",
        "ingest": {"chroms": "chr1, chr2", "chunk_bins": 4096},
        "train": {"epochs": 2, "use_gpu": True},
        "impute": {"targets": ["A:H3K27ac", "B:H3K4me3"]},
    })
    cfg = load_job_config(path)
    out = str(tmp_path / "results")
    assert cfg["out"] == out
    assert (cfg["store"], cfg["model"], cfg["run"]) == (
        f"{out}/store", f"{out}/model", f"{out}/run")
    assert cfg["manifest"] == str(inputs / "manifest.tsv")
    assert cfg["chrom_sizes"] == "s3://bucket/hg38.chrom.sizes"
    assert cfg["ingest"]["chroms"] == ["chr1", "chr2"]
    assert cfg["ingest"]["chunk_bins"] == 4096 and cfg["ingest"]["force"] is False
    assert cfg["impute"]["targets"] == "A:H3K27ac,B:H3K4me3"
    for spec, expected in [("targets.tsv", str(tmp_path / "cfg" / "targets.tsv")),
                           ("s3://b/t.tsv", "s3://b/t.tsv"), ("A:H3K27ac", "A:H3K27ac")]:
        _write(tmp_path / "cfg" / "t.yaml", {"impute": {"targets": spec}})
        assert load_job_config(str(tmp_path / "cfg" / "t.yaml"))["impute"]["targets"] == expected
    assert cfg["impute"]["export"] is True and cfg["impute"]["space"] == "pval"
    assert cfg["simulate"] is None and cfg["evaluate"] is None
    assert stages_for("pipeline", cfg) == ("ingest", "train", "impute")
    assert stages_for("train", cfg) == ("train",)


def test_empty_section_means_defaults(tmp_path):
    (tmp_path / "job.yaml").write_text("out: o\nsimulate:\nevaluate:\n")
    cfg = load_job_config(str(tmp_path / "job.yaml"))
    assert stages_for("pipeline", cfg) == ("simulate", "ingest", "train", "impute", "evaluate")
    assert cfg["evaluate"]["truth"] == str(tmp_path / "o" / "consortium" / "truth" / "targets.tsv")


def test_load_json_and_url_outputs(tmp_path):
    path = _write(tmp_path / "job.json", {
        "store": "s3://b/x/store", "model": "s3://b/x/model", "run": "run",
        "simulate": {"seed": 3}, "out": "s3://b/x", "evaluate": {}})
    cfg = load_job_config(path)
    assert cfg["run"] == str(tmp_path / "run")
    assert cfg["simulate"]["out"] == "s3://b/x/consortium"
    assert cfg["manifest"] == "s3://b/x/consortium/manifest.tsv"
    assert cfg["chrom_sizes"] == "s3://b/x/consortium/chrom.sizes"
    assert cfg["evaluate"]["truth"] == "s3://b/x/consortium/truth/targets.tsv"
    assert cfg["evaluate"]["out"] == "s3://b/x/evaluation"
    assert stages_for("pipeline", cfg) == ("simulate", "ingest", "train", "impute", "evaluate")


@pytest.mark.parametrize("raw,expected", [
    ({"stroe": "/x"}, ["stroe", "the top level", "store", "manifest", "chrom_sizes"]),
    ({"ingest": {"chunkbins": 5}}, ["chunkbins", "ingest section", "chunk_bins", "dtype"]),
    ({"impute": {"gpu": 1}}, ["gpu", "impute section", "gpus", "batch_bins"]),
    ({"ingest": {"chunk_bins": "big"}}, ["ingest.chunk_bins", "integer", "'big'"]),
    ({"impute": {"space": "log"}}, ["impute.space", "pval", "arcsinh"]),
    ({"ingest": {"force": "yes"}}, ["ingest.force", "true or false"]),
    ({"store": 5}, ["store", "path or URL"]),
    ({"simulate": {}}, ["simulate", "out"]),
])
def test_load_rejects_bad_configs_with_the_valid_keys(tmp_path, raw, expected):
    path = _write(tmp_path / "job.yaml", raw)
    with pytest.raises(InputError) as e:
        load_job_config(path)
    for word in expected:
        assert word in str(e.value)
    assert str(path) in str(e.value)


def test_load_missing_or_malformed_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_job_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("store: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_job_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InputError, match="mapping"):
        load_job_config(str(tmp_path / "list.yaml"))


# ------------------------------------------------------------------ preflight


def _cfg(tmp_path, inputs, **extra) -> dict:
    raw = {"out": str(tmp_path / "out"), "manifest": str(inputs / "manifest.tsv"),
           "chrom_sizes": str(inputs / "chrom.sizes"), **extra}
    return load_job_config(_write(tmp_path / "job.yaml", raw))


def test_preflight_passes_and_creates_nothing(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs)
    preflight(cfg, stages_for("pipeline", cfg))
    assert not (tmp_path / "out").exists()


def test_preflight_missing_manifest(tmp_path, inputs):
    (inputs / "manifest.tsv").unlink()
    cfg = _cfg(tmp_path, inputs)
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["ingest"])
    msg = str(e.value)
    assert f"Manifest {inputs / 'manifest.tsv'} does not exist" in msg
    assert "nothing was started" in msg


def test_preflight_missing_bigwig_is_named(tmp_path, inputs):
    (inputs / "bw" / "B-H3K27ac.bigWig").unlink()
    cfg = _cfg(tmp_path, inputs)
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["ingest"])
    msg = str(e.value)
    assert str(inputs / "bw" / "B-H3K27ac.bigWig") in msg
    assert "A-H3K4me3" not in msg
    assert "1 of the 2 bigWig files listed in the manifest do not exist" in msg


def test_preflight_reports_every_problem(tmp_path, inputs):
    (inputs / "chrom.sizes").unlink()
    (inputs / "bw" / "A-H3K4me3.bigWig").unlink()
    cfg = _cfg(tmp_path, inputs, ingest={"chroms": ["chr1"]})
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["ingest"])
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert f"Chromosome sizes file {inputs / 'chrom.sizes'} does not exist" in msg
    assert "A-H3K4me3.bigWig" in msg


def test_preflight_bad_chromosome_and_bad_manifest(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs, ingest={"chroms": ["chrX"]})
    with pytest.raises(EdiceError, match="chrX"):
        preflight(cfg, ["ingest"])
    (inputs / "manifest.tsv").write_text("cell\tassay\tpath\nA\tH3K4me3\tx.bw\n")
    cfg = _cfg(tmp_path, inputs)
    with pytest.raises(EdiceError, match="lacks the column"):
        preflight(cfg, ["ingest"])


def test_preflight_inputs_of_later_stages(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs, train={"config_file": "missing-train.yaml"})
    # The pipeline makes the store and the model itself: only the train config is missing.
    with pytest.raises(EdiceError) as e:
        preflight(cfg, stages_for("pipeline", cfg))
    assert "1 problem(s)" in str(e.value)
    assert str(tmp_path / "missing-train.yaml") in str(e.value)
    # Alone, train needs an existing store and impute a trained model.
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["train"])
    assert f"No track store at {tmp_path / 'out' / 'store'}" in str(e.value)
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["impute"])
    assert str(tmp_path / "out" / "model" / "model.pt") in str(e.value)


def test_preflight_unwritable_output(tmp_path, inputs):
    (tmp_path / "afile").write_text("x")
    cfg = _cfg(tmp_path, inputs, store=str(tmp_path / "afile" / "store"), run=str(tmp_path / "afile"))
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["ingest"])
    assert f"{tmp_path / 'afile'} is a file, not a folder" in str(e.value)
    with pytest.raises(EdiceError) as e:
        preflight(cfg, stages_for("pipeline", cfg))
    assert f"Run folder {tmp_path / 'afile'} is an existing file" in str(e.value)


def test_preflight_needs_paths_for_its_stages(tmp_path):
    cfg = load_job_config(_write(tmp_path / "job.yaml", {"store": str(tmp_path / "s")}))
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["impute"])
    assert "needs `model:`" in str(e.value) and "needs `run:`" in str(e.value)


def test_preflight_checks_stage_settings(tmp_path, inputs):
    """Settings that training or simulation would reject fail before ingest starts."""
    cfg = _cfg(tmp_path, inputs, train={"epochs": 0, "lr": "fast"})
    with pytest.raises(EdiceError) as e:
        preflight(cfg, stages_for("pipeline", cfg))
    assert "lr" in str(e.value)
    cfg = load_job_config(_write(tmp_path / "sim.yaml", {
        "out": str(tmp_path / "o"), "simulate": {"n_cell_types": 1}}))
    with pytest.raises(EdiceError, match="n_cell_types"):
        preflight(cfg, stages_for("pipeline", cfg))


@pytest.mark.parametrize("name", ["example-pipeline.yaml", "example-impute.yaml",
                                  "example-demo.yaml"])
def test_example_configs_load(name):
    cfg = load_job_config(str(REPO / "jobs" / name))
    job = "impute" if "impute" in name else "pipeline"
    assert "impute" in stages_for(job, cfg)
    assert cfg["store"] and cfg["model"] and cfg["run"]


def test_preflight_unreachable_store_fails_fast(tmp_path, inputs, monkeypatch):
    """An S3 endpoint where nothing listens: one clear message per bucket within
    seconds, not botocore's retries."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    cfg = load_job_config(_write(tmp_path / "job.yaml", {
        "out": "s3://edice-results/run1", "manifest": "s3://edice-inputs/manifest.tsv",
        "chrom_sizes": "s3://edice-inputs/chrom.sizes"}))
    t0 = time.monotonic()
    with pytest.raises(EdiceError) as e:
        preflight(cfg, stages_for("pipeline", cfg))
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert elapsed < 10, elapsed
    assert "cannot reach the S3 endpoint" in msg and os.environ["AWS_ENDPOINT_URL"] in msg
    assert "s3://edice-inputs/manifest.tsv" in msg and "s3://edice-results/run1/store" in msg
    assert "2 problem(s)" in msg  # one per bucket


# ------------------------------------------------------------------ running stages


def _fake_stages(monkeypatch) -> list:
    """Stand-ins for the stage modules that record how they were called."""
    calls: list = []

    def mod(name, **fns):
        m = types.ModuleType(name)
        for k, f in fns.items():
            setattr(m, k, f)
        monkeypatch.setitem(sys.modules, name, m)

    mod("edice_dist.ingest", ingest=lambda *a, **k: calls.append(("ingest", a, k)))
    mod("edice_dist.train", train=lambda *a, **k: calls.append(("train", a, k)))
    mod("edice_dist.impute", impute=lambda *a, **k: calls.append(("impute", a, k)))
    return calls


def test_run_stages_passes_the_config_on(tmp_path, inputs, monkeypatch):
    calls = _fake_stages(monkeypatch)
    cfg = _cfg(tmp_path, inputs,
               ingest={"chroms": ["chr2"], "chunk_bins": 512, "dtype": "float32", "workers": 3},
               train={"epochs": 1, "use_gpu": False, "lr": 0.001},
               impute={"targets": "A:H3K27ac", "gpus": 0, "batch_bins": 256, "space": "arcsinh",
                       "genome": "hg19", "hub_observed": "copy"})
    out = tmp_path / "out"
    done = run_stages(cfg, stages_for("pipeline", cfg))
    assert done == {"ingest": f"{out}/store", "train": f"{out}/model", "impute": f"{out}/run"}
    assert calls[0] == ("ingest", (str(inputs / "manifest.tsv"), str(inputs / "chrom.sizes"),
                                   f"{out}/store"),
                        {"force": False, "chroms": ["chr2"], "chunk_bins": 512,
                         "dtype": "float32", "workers": 3})
    # Training keys reach train typed, in its config (the YAML values, never made text).
    name, args, kw = calls[1]
    assert (name, args[:2], kw) == ("train", (f"{out}/store", f"{out}/model"), {"resume": False})
    assert (args[2].epochs, args[2].use_gpu, args[2].lr) == (1, False, 0.001)
    assert calls[2] == ("impute", (f"{out}/store", f"{out}/model", f"{out}/run"),
                        {"targets": "A:H3K27ac", "chroms": None, "force": False, "workers": None,
                         "gpus": 0, "space": "arcsinh", "export": True, "batch_bins": 256,
                         "dtype": None, "hub": True, "genome": "hg19", "hub_observed": "copy",
                         "hub_email": "nobody@example.org", "uncertainty": 0})


def test_train_resume_flag(tmp_path, inputs, monkeypatch):
    """An interrupted run resumes by itself (train's folder protocol); `resume: true`
    asks to train a finished run further."""
    calls = _fake_stages(monkeypatch)
    cfg = _cfg(tmp_path, inputs)
    run_stages(cfg, ["train"])
    assert calls[-1][2] == {"resume": False}
    cfg["train"] = {"resume": True}
    run_stages(cfg, ["train"])
    assert calls[-1][2] == {"resume": True}


def test_gpus_are_requested_before_gpu_stages_and_released(tmp_path, inputs, monkeypatch,
                                                           ray_local):
    """With `cluster: {gpus: N}` the job asks the autoscaler for N GPUs before training
    (an autoscaling cluster starts without GPU nodes), fails clearly when they do not
    come, and always withdraws the request."""
    import ray.autoscaler.sdk as sdk

    from edice_dist import jobconfig

    requests = []
    real = sdk.request_resources

    def record(**kw):
        requests.append(kw)
        real(**kw)  # the real call, against the session's local Ray

    monkeypatch.setattr(sdk, "request_resources", record)
    calls = _fake_stages(monkeypatch)
    cfg = _cfg(tmp_path, inputs, cluster={"gpus": 2, "gpu_wait_s": 1})
    t0 = time.monotonic()
    with pytest.raises(EdiceError) as e:
        run_stages(cfg, stages_for("pipeline", cfg))
    assert time.monotonic() - t0 < 10
    assert "asked for 2 GPU(s)" in str(e.value) and "has 0" in str(e.value)
    assert [c[0] for c in calls] == ["ingest"]  # stopped before train
    # Asked at every poll until the wait gives up, then withdrawn.
    assert len(requests) >= 2 and requests[-1] == {"bundles": []}
    assert all(r == {"bundles": [{"GPU": 1}, {"GPU": 1}]} for r in requests[:-1])
    # Without cluster.gpus nothing is requested; with GPUs present nothing waits.
    requests.clear()
    cfg["cluster"] = None
    run_stages(cfg, ["train"])
    assert requests == []
    assert jobconfig.wait_for_gpus(0, timeout_s=1) == 0


def test_the_gpu_request_outlasts_another_requester_replacing_it(monkeypatch):
    """The autoscaler keeps the last request sent to it, and once Ray Train has run on a
    cluster its AutoscalingCoordinator sends its own every 20 s. Here it replaces the
    job's request before the autoscaler first looks: the wait, asking again at every
    poll, still gets its GPUs (asked once, it would wait in vain)."""
    import ray
    import ray.autoscaler.sdk as sdk

    from edice_dist import jobconfig

    cluster = {"request": [], "gpus": 0, "looks": 0}

    def request_resources(bundles):
        cluster["request"] = bundles

    def cluster_resources():
        cluster["looks"] += 1
        if cluster["looks"] == 2:  # the first look is the wait's own "have we got them?"
            cluster["request"] = []  # the coordinator's tick
        cluster["gpus"] = max(cluster["gpus"], sum(b.get("GPU", 0) for b in cluster["request"]))
        return {"CPU": 1, "GPU": cluster["gpus"]}

    monkeypatch.setattr(sdk, "request_resources", request_resources)
    monkeypatch.setattr(ray, "cluster_resources", cluster_resources)
    assert jobconfig.wait_for_gpus(2, timeout_s=5, poll_s=0.01) == 2
    assert cluster["looks"] == 3


# ------------------------------------------------------------------ the scripts


def _run_job(job: str, config: str, *extra: str, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update(env or {})
    return subprocess.run([PY, str(REPO / "jobs" / f"{job}.py"), "--config", config, *extra],
                          capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


def test_job_script_fails_before_any_work(tmp_path, inputs):
    (inputs / "bw" / "A-H3K4me3.bigWig").unlink()
    config = _write(tmp_path / "job.yaml", {
        "out": str(tmp_path / "out"), "manifest": str(inputs / "manifest.tsv"),
        "chrom_sizes": str(inputs / "chrom.sizes")})
    t0 = time.monotonic()
    r = _run_job("pipeline", config)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 60
    assert "jobs/pipeline.py: error:" in r.stderr
    assert str(inputs / "bw" / "A-H3K4me3.bigWig") in r.stderr
    assert "Traceback" not in r.stderr
    assert "Ray" not in r.stderr.split("error:")[0]  # no cluster was joined or started
    assert not (tmp_path / "out").exists()


def test_job_script_check_only(tmp_path, inputs):
    config = _write(tmp_path / "job.yaml", {
        "out": str(tmp_path / "out"), "manifest": str(inputs / "manifest.tsv"),
        "chrom_sizes": str(inputs / "chrom.sizes")})
    r = _run_job("ingest", config, "--check")
    assert r.returncode == 0, r.stderr
    assert "preflight ok" in r.stderr
    assert not (tmp_path / "out").exists()
    r = _run_job("ingest", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = subprocess.run([PY, str(REPO / "jobs" / "impute.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "--config" in r.stderr


# ------------------------------------------------------------------ ray job submit, end to end

# A consortium of 4 cell types x 3 assays on 210 kb (10 observed tracks, 2 held out) and a
# model small enough to train one epoch in seconds.
TINY_SIM = {"seed": 1, "chrom_sizes": "chr1:150007,chr2:60011", "n_cell_types": 4,
            "n_tissues": 2, "assays": "H3K4me3,H3K27ac,H3K4me1",
            "core_assays": "H3K4me3,H3K4me1", "n_test": 2, "zoom_levels": 0}
TINY_TRAIN = {"embed_dim": 16, "n_heads": 2, "ffn_dim": 16, "decoder_hidden": 32,
              "epochs": 1, "bins_per_epoch": 2048, "batch_size": 64, "val_bins": 1000,
              "workers": 1, "cpus_per_worker": 1, "seed": 0}


def _read_tsv(path: Path) -> list[dict]:
    lines = [ln.split("\t") for ln in path.read_text().splitlines() if ln.strip()]
    return [dict(zip(lines[0], row, strict=False)) for row in lines[1:]]


def check_exported_bigwigs(consortium: Path, bigwig_dir: Path) -> dict[str, np.ndarray]:
    """The bigWigs of a run, read with pyBigWig and checked against the simulated
    consortium: one per missing (cell type, assay) pair, every chromosome of chrom.sizes
    at its full length in 25 bp steps, finite -log10 p values >= 0 that vary.

    Returns the values per file name (all chromosomes concatenated)."""
    import pyBigWig

    sizes = dict((c, int(s)) for c, s in (ln.split()[:2] for ln in
                                          (consortium / "chrom.sizes").read_text().splitlines()))
    observed = {(r["cell_type"], r["assay"]) for r in _read_tsv(consortium / "manifest.tsv")}
    cells = sorted({c for c, _ in observed})
    assays = sorted({a for _, a in observed})
    missing = {(c, a) for c in cells for a in assays} - observed
    truth = {(r["cell_type"], r["assay"]) for r in _read_tsv(consortium / "truth" / "targets.tsv")}
    assert truth <= missing and missing
    files = sorted(p.name for p in bigwig_dir.glob("*.bigWig"))
    assert files == sorted(f"{c}-{a}.bigWig" for c, a in missing)
    values = {}
    for name in files:
        bw = pyBigWig.open(str(bigwig_dir / name))
        try:
            assert bw.chroms() == sizes
            parts = []
            for chrom, size in sizes.items():
                iv = bw.intervals(chrom)
                starts = np.array([s for s, _, _ in iv])
                ends = np.array([e for _, e, _ in iv])
                assert starts[0] == 0 and ends[-1] == size
                assert np.all(starts[1:] == ends[:-1])  # contiguous
                assert np.all(ends[:-1] - starts[:-1] == 25)  # 25 bp steps (last may be short)
                v = np.array([x for _, _, x in iv], dtype=np.float64)
                parts.append(v)
            v = np.concatenate(parts)
        finally:
            bw.close()
        assert np.isfinite(v).all() and (v >= 0).all()
        assert v.std() > 0
        values[name] = v
    return values


@pytest.mark.slow
def test_ray_job_submit_e2e(tmp_path):
    """`ray job submit` of jobs/pipeline.py to a real local head node: the job simulates
    a small consortium, ingests, trains, imputes and exports; the bigWigs land where the
    config says and are checked with pyBigWig."""
    out = tmp_path / "out"
    config = _write(tmp_path / "job.yaml", {
        "out": str(out), "simulate": TINY_SIM, "ingest": {"chunk_bins": 2048},
        "train": TINY_TRAIN, "impute": {}, "evaluate": {"plots": False}})
    head = RayHead(num_cpus=2, extra_env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}).start()
    sid = f"edice-e2e-{os.getpid()}"
    try:
        # Token authentication is on: without the token the job API refuses requests.
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=10)
        assert e.value.code == 401
        assert head.job(sid) is None  # with it: no such job yet

        r = head.ray_cli("job", "submit", "--address", head.address, "--submission-id", sid,
                         "--working-dir", str(REPO), "--runtime-env",
                         str(REPO / "jobs" / "runtime_env.yaml"), "--no-wait", "--",
                         "python", "jobs/pipeline.py", "--config", config)
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 480
        status = None
        while time.monotonic() < deadline:
            status = head.job(sid)["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
        logs = head.ray_cli("job", "logs", "--address", head.address, sid).stdout
        assert status == "SUCCEEDED", f"job {sid} is {status}:\n{logs[-6000:]}"
        # The job joined the cluster it was submitted to (RAY_ADDRESS set by the job).
        ray_line = [ln for ln in logs.splitlines() if ln.startswith("Ray: ")]
        assert ray_line == [f"Ray: 2 CPUs, 0 GPUs, 1 node(s) at 127.0.0.1:{head.ports['gcs']}"]
        assert f"bigWigs   -> {out / 'run' / 'bigwig'}" in logs
    finally:
        head.stop()
    assert head.proc.poll() is not None

    values = check_exported_bigwigs(out / "consortium", out / "run" / "bigwig")
    assert len(values) == 2
    metrics = _read_tsv(out / "evaluation" / "metrics.tsv")
    assert {(r["cell_type"], r["assay"]) for r in metrics if r["method"] == "model"} == {
        tuple(n[: -len(".bigWig")].split("-")) for n in values}
