"""Object storage: `edice_dist.storage`, Zarr stores and the job preflight against an
S3-compatible server started on 127.0.0.1 (moto), checked with an independent boto3
client; and the whole pipeline on S3 against the same run on local disk."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edice_dist import _partial, storage
from edice_dist.errors import EdiceError
from edice_dist.jobconfig import load_job_config, stages_for
from edice_dist.preflight import preflight

sys.path.insert(0, str(Path(__file__).parent))
from s3server import S3Server, clear_fsspec_cache  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, with the AWS_* environment exported."""
    server = S3Server(bucket="edice-test").start()
    mp = pytest.MonkeyPatch()
    for k, v in server.env().items():
        mp.setenv(k, v)
    mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    clear_fsspec_cache()
    try:
        yield server
    finally:
        mp.undo()
        clear_fsspec_cache()
        server.stop()


@pytest.fixture
def prefix(s3, request):
    """A fresh key prefix per test."""
    return f"t-{request.node.name[:40]}-{time.monotonic_ns()}"


def _body(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


# ------------------------------------------------------------------ storage.py


def test_write_read_exists(s3, prefix):
    url = s3.url(prefix, "a", "b.txt")
    assert not storage.exists(url)
    storage.write_text_atomic(url, "hello\n")
    assert _body(s3, f"{prefix}/a/b.txt") == b"hello\n"
    assert storage.exists(url) and storage.exists(s3.url(prefix, "a"))
    assert storage.read_text(url) == "hello\n"
    storage.write_bytes_atomic(url, b"\x00\x01")
    assert storage.read_bytes(url) == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        storage.read_text(s3.url(prefix, "missing"))


def test_list_dir_and_remove(s3, prefix):
    for key in ("d/x/1", "d/x/2", "d/y", "dx/z"):
        storage.write_text_atomic(s3.url(prefix, key), key)
    assert storage.list_dir(s3.url(prefix, "d")) == ["x", "y"]
    assert storage.list_dir(s3.url(prefix, "nothing")) == []
    storage.remove(s3.url(prefix, "d"))
    assert s3.keys(prefix) == [f"{prefix}/dx/z"]
    storage.remove(s3.url(prefix, "d"))  # absent: fine
    storage.remove(s3.url(prefix, "dx", "z"))
    assert s3.keys(prefix) == []


def test_rename_file_and_folder(s3, prefix):
    storage.write_text_atomic(s3.url(prefix, "f.txt"), "f")
    storage.rename(s3.url(prefix, "f.txt"), s3.url(prefix, "g.txt"))
    assert s3.keys(prefix) == [f"{prefix}/g.txt"]
    # A folder (a store being finalised) moves whole; a sibling sharing its name as a
    # prefix ("store.partial2") stays.
    for key in ("store.partial/zarr.json", "store.partial/signal/chr1/c/0/0",
                "store.partial/signal/chr1/zarr.json", "store.partial2/keep"):
        storage.write_text_atomic(s3.url(prefix, key), key)
    storage.rename(s3.url(prefix, "store.partial"), s3.url(prefix, "store"))
    assert s3.keys(prefix) == sorted([
        f"{prefix}/g.txt", f"{prefix}/store.partial2/keep", f"{prefix}/store/zarr.json",
        f"{prefix}/store/signal/chr1/c/0/0", f"{prefix}/store/signal/chr1/zarr.json"])
    assert _body(s3, f"{prefix}/store/signal/chr1/c/0/0") == b"store.partial/signal/chr1/c/0/0"
    assert not storage.exists(s3.url(prefix, "store.partial"))
    with pytest.raises(FileNotFoundError):
        storage.rename(s3.url(prefix, "nope"), s3.url(prefix, "nope2"))


def test_local_copy_and_upload(s3, prefix, tmp_path):
    src = tmp_path / "track.bigWig"
    data = os.urandom(100_000)
    src.write_bytes(data)
    storage.upload(str(src), s3.url(prefix, "in", "track.bigWig"))
    assert _body(s3, f"{prefix}/in/track.bigWig") == data
    with storage.local_copy(s3.url(prefix, "in", "track.bigWig"), suffix=".bigWig") as local:
        assert local.endswith(".bigWig") and os.path.isfile(local)
        assert Path(local).read_bytes() == data
    assert not os.path.exists(local)  # the download is temporary


def test_partial_finalise_on_s3(s3, prefix):
    final = s3.url(prefix, "store")
    root = _partial.partial_path(final)
    storage.write_text_atomic(storage.join(root, "zarr.json"), "{}")
    for i in range(3):
        _partial.mark_done(root, "chr1", i)
    assert _partial.done_set(root) == {("chr1", 0), ("chr1", 1), ("chr1", 2)}
    with pytest.raises(EdiceError, match="missing 1 of 4"):
        _partial.check_complete(root, [("chr1", i) for i in range(4)], "store")
    _partial.check_complete(root, [("chr1", i) for i in range(3)], "store")
    _partial.finalise(root, final)
    assert s3.keys(prefix) == [f"{prefix}/store/zarr.json"]


def test_zarr_array_round_trip(s3, prefix):
    import zarr

    url = s3.url(prefix, "z.zarr")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1000, 7)).astype("float32")
    g = zarr.open_group(storage.zarr_store(url), mode="w", zarr_format=3)
    a = g.create_array("signal", shape=data.shape, chunks=(256, 7), dtype="float32")
    a[:] = data
    g.attrs["format"] = "test"
    keys = s3.keys(f"{prefix}/z.zarr")
    assert f"{prefix}/z.zarr/zarr.json" in keys
    assert sum(k.startswith(f"{prefix}/z.zarr/signal/c/") for k in keys) == 4  # ceil(1000/256)
    r = zarr.open_group(storage.zarr_store(url, read_only=True), mode="r")
    np.testing.assert_array_equal(r["signal"][:], data)
    np.testing.assert_array_equal(r["signal"][300:301], data[300:301])
    assert r.attrs["format"] == "test"
    with pytest.raises(Exception):  # noqa: B017 - any zarr/fsspec error type will do
        r["signal"][0, 0] = 1.0


# ------------------------------------------------------------------ preflight on S3


def _inputs_on_s3(s3, prefix, tmp_path, tracks=("A\tH3K4me3", "B\tH3K27ac")):
    lines = ["cell_type\tassay\tpath"]
    for i, t in enumerate(tracks):
        f = tmp_path / f"t{i}.bigWig"
        f.write_bytes(b"placeholder")
        storage.upload(str(f), s3.url(prefix, "in", "bw", f"t{i}.bigWig"))
        lines.append(f"{t}\tbw/t{i}.bigWig")
    storage.write_text_atomic(s3.url(prefix, "in", "manifest.tsv"), "\n".join(lines) + "\n")
    storage.write_text_atomic(s3.url(prefix, "in", "chrom.sizes"), "chr1\t10000\n")


def _s3_cfg(s3, prefix, tmp_path, **extra) -> dict:
    import yaml

    raw = {"out": s3.url(prefix, "out"), "manifest": s3.url(prefix, "in", "manifest.tsv"),
           "chrom_sizes": s3.url(prefix, "in", "chrom.sizes"), **extra}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return load_job_config(str(tmp_path / "job.yaml"))


def test_preflight_on_s3_passes_and_leaves_nothing(s3, prefix, tmp_path):
    _inputs_on_s3(s3, prefix, tmp_path)
    before = s3.keys(prefix)
    cfg = _s3_cfg(s3, prefix, tmp_path)
    preflight(cfg, stages_for("pipeline", cfg))
    assert s3.keys(prefix) == before  # the write probes were removed


def test_preflight_on_s3_missing_inputs(s3, prefix, tmp_path):
    _inputs_on_s3(s3, prefix, tmp_path)
    s3.client().delete_object(Bucket=s3.bucket, Key=f"{prefix}/in/bw/t1.bigWig")
    cfg = _s3_cfg(s3, prefix, tmp_path)
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["ingest"])
    assert s3.url(prefix, "in", "bw", "t1.bigWig") in str(e.value)
    assert "t0.bigWig" not in str(e.value)
    cfg["impute"] = {"targets": s3.url(prefix, "in", "targets.tsv")}
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["impute"])
    assert f"No track store at {s3.url(prefix, 'out', 'store')}" in str(e.value)
    assert s3.url(prefix, "out", "model", "model.pt") in str(e.value)
    assert f"Targets file {s3.url(prefix, 'in', 'targets.tsv')} does not exist" in str(e.value)


def test_preflight_on_s3_missing_bucket(s3, prefix, tmp_path):
    _inputs_on_s3(s3, prefix, tmp_path)
    cfg = _s3_cfg(s3, prefix, tmp_path, out="s3://no-such-bucket/edice")
    with pytest.raises(EdiceError) as e:
        preflight(cfg, ["ingest"])
    msg = str(e.value)
    assert "s3://no-such-bucket/edice/store" in msg and "bucket does not exist" in msg
    assert s3.endpoint in msg


def test_preflight_without_credentials(s3, prefix, tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    cfg = _s3_cfg(s3, prefix, tmp_path)
    with pytest.raises(EdiceError, match="no S3 credentials were found"):
        preflight(cfg, ["impute"])


# ------------------------------------------------------------------ the pipeline on S3

TINY_SIM = {"seed": 2, "chrom_sizes": "chr1:150007,chr2:60011", "n_cell_types": 4,
            "n_tissues": 2, "assays": "H3K4me3,H3K27ac,H3K4me1",
            "core_assays": "H3K4me3,H3K4me1", "n_test": 2, "zoom_levels": 0}
# One training worker with one thread, so that both runs do the same arithmetic.
TINY_TRAIN = {"embed_dim": 16, "n_heads": 2, "ffn_dim": 16, "decoder_hidden": 32,
              "epochs": 1, "bins_per_epoch": 2048, "batch_size": 64, "val_bins": 1000,
              "workers": 1, "cpus_per_worker": 1, "seed": 0}


def _bigwig_values(path: str) -> dict[str, np.ndarray]:
    import pyBigWig

    bw = pyBigWig.open(path)
    try:
        return {c: np.asarray(bw.values(c, 0, n, numpy=True)) for c, n in bw.chroms().items()}
    finally:
        bw.close()


@pytest.mark.slow
def test_pipeline_on_s3_equals_local(s3, tmp_path, ray_local):
    """Ingest (bigWigs read from S3, store written to S3), train (model on S3), impute and
    export (run folder on S3) through jobs/pipeline.py, against the same stages on local
    disk: equal stores, equal models and equal bigWigs."""
    import subprocess

    import torch
    import yaml
    import zarr

    from edice_dist.jobconfig import run_stages
    from edice_dist.simulate import SimConfig, simulate

    cons = tmp_path / "consortium"
    simulate(str(cons), SimConfig.from_overrides({k: str(v) for k, v in TINY_SIM.items()}))
    client = s3.client()
    for f in [cons / "manifest.tsv", cons / "chrom.sizes", *(cons / "bigwig").iterdir()]:
        client.upload_file(str(f), s3.bucket, f"in/{f.relative_to(cons)}")
    stages = {"ingest": {"chunk_bins": 2048}, "train": TINY_TRAIN, "impute": {"workers": 1}}

    # On S3, as a job would run: a fresh process with the AWS_* environment.
    s3_cfg = {"out": s3.url("out"), "manifest": s3.url("in/manifest.tsv"),
              "chrom_sizes": s3.url("in/chrom.sizes"), **stages}
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump(s3_cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    job = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "pipeline.py"),
                          "--config", str(tmp_path / "s3.yaml")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-6000:]

    # On local disk, the same stages in this process (the session's local Ray).
    (tmp_path / "local.yaml").write_text(yaml.safe_dump({
        "out": str(tmp_path / "out"), "manifest": str(cons / "manifest.tsv"),
        "chrom_sizes": str(cons / "chrom.sizes"), **stages}))
    local_cfg = load_job_config(str(tmp_path / "local.yaml"))
    run_stages(local_cfg, stages_for("pipeline", local_cfg))

    keys = s3.keys("out/")
    assert "out/store/zarr.json" in keys and "out/model/model.pt" in keys
    assert not any(".partial" in k or "/_done/" in k for k in keys)

    # The stores: every array equal.
    a = zarr.open_group(storage.zarr_store(s3.url("out/store"), read_only=True), mode="r")
    b = zarr.open_group(str(tmp_path / "out" / "store"), mode="r")
    ta, tb = a.attrs["tracks"], b.attrs["tracks"]
    assert [t["source"] for t in ta] == [s3.url("in", t["source"][len(str(cons)) + 1:]) for t in tb]
    assert [{**t, "source": ""} for t in ta] == [{**t, "source": ""} for t in tb]
    names = sorted(k for k, _ in b["signal"].arrays())
    assert names and sorted(k for k, _ in a["signal"].arrays()) == names
    for name in names:
        np.testing.assert_array_equal(a["signal"][name][:], b["signal"][name][:])

    # The models: the same weights.
    sa = torch.load(io.BytesIO(_body(s3, "out/model/model.pt")), weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "out" / "model" / "model.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)

    # The bigWigs, downloaded with boto3 and read with pyBigWig.
    local_bw = tmp_path / "out" / "run" / "bigwig"
    names = sorted(p.name for p in local_bw.glob("*.bigWig"))
    assert len(names) == 2
    assert sorted(k.rsplit("/", 1)[1] for k in keys
                  if k.startswith("out/run/bigwig/") and k.endswith(".bigWig")) == names
    for name in names:
        dl = tmp_path / "dl" / name
        dl.parent.mkdir(exist_ok=True)
        client.download_file(s3.bucket, f"out/run/bigwig/{name}", str(dl))
        va, vb = _bigwig_values(str(dl)), _bigwig_values(str(local_bw / name))
        assert va.keys() == vb.keys()
        for chrom in va:
            assert np.isfinite(va[chrom]).all() and va[chrom].std() > 0
            np.testing.assert_allclose(va[chrom], vb[chrom], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ each source read once

# Enough chunks for several encode partitions (the old ingest downloaded every source in
# every partition), and bigWigs with zoom levels, as real ones have.
ONCE_SIM = {"seed": 3, "chrom_sizes": "chr1:700007,chr2:500011", "n_cell_types": 6,
            "n_tissues": 2, "assays": "H3K4me3,H3K27ac,H3K4me1,H3K36me3",
            "core_assays": "H3K4me3,H3K4me1,H3K36me3", "n_test": 3}
RATIO = 1.25  # bytes served per source byte, at most (issue 12)


def _job_env(s3) -> dict:
    """A fresh process's environment for a stage on S3 (its own Ray reads AWS_*)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3.env())
    return env


def _edice(s3, *args: str, timeout: int = 300) -> str:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "edice_dist", *args], env=_job_env(s3),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-6000:]
    return r.stderr


def _served(s3, sent: dict[str, int], prefix: str) -> dict[str, tuple[int, int]]:
    """{key: (bytes served, object size)} of every object under ``prefix``."""
    sizes = {o["Key"]: o["Size"] for page in s3.client().get_paginator(
        "list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
        for o in page.get("Contents", [])}
    return {k: (sent.get(f"{s3.bucket}/{k}", 0), n) for k, n in sizes.items()}


@pytest.fixture(scope="module")
def once(s3, tmp_path_factory):
    """A consortium on S3, ingested from S3 into S3 by `edice ingest` in a fresh process,
    with the bytes the server sent during the ingest."""
    from edice_dist.simulate import SimConfig, simulate

    cons = tmp_path_factory.mktemp("once") / "consortium"
    simulate(str(cons), SimConfig.from_overrides({k: str(v) for k, v in ONCE_SIM.items()}))
    client = s3.client()
    for f in sorted(p for p in cons.rglob("*") if p.is_file()):
        client.upload_file(str(f), s3.bucket, f"once/in/{f.relative_to(cons)}")
    s3.reset_counts()
    err = _edice(s3, "ingest", s3.url("once/in/manifest.tsv"), "--chrom-sizes",
                 s3.url("once/in/chrom.sizes"), "--out", s3.url("once/store"),
                 "--chunk-bins", "1024")
    return {"cons": cons, "sent": s3.bytes_sent(), "log": err}


@pytest.mark.slow
def test_ingest_reads_each_source_once(s3, once, tmp_path, ray_local):
    """Every bigWig of the manifest is fetched from object storage about once (its header
    bytes for validation, its body once by the task that decodes it), however many encode
    partitions the store has; the store equals one ingested from local disk."""
    import zarr

    from edice_dist.ingest import ingest

    served = _served(s3, once["sent"], "once/in/bigwig/")
    assert len(served) >= 15
    parts = int(once["log"].split("source(s) to decode once, then ")[1].split()[0])
    assert parts >= 4  # several encode tasks, each of which needs every track
    total = sum(n for n, _ in served.values()) / sum(size for _, size in served.values())
    worst = max(n / size for n, size in served.values())
    assert all(n >= size for n, size in served.values())  # each was read, in full
    assert total <= RATIO and worst <= RATIO, (total, worst)
    print(f"ingest: {len(served)} sources, {parts} encode tasks: served {total:.3f}x the "
          f"sources' bytes (worst source {worst:.3f}x)")

    local = str(tmp_path / "local.zarr")
    ingest(str(once["cons"] / "manifest.tsv"), str(once["cons"] / "chrom.sizes"), local,
           chunk_bins=1024)
    a = zarr.open_group(storage.zarr_store(s3.url("once/store"), read_only=True), mode="r")
    b = zarr.open_group(local, mode="r")
    names = sorted(k for k, _ in b["signal"].arrays())
    assert names == ["chr1", "chr2"]
    for name in names:
        np.testing.assert_array_equal(a["signal"][name][:], b["signal"][name][:])
    assert not any("_scratch" in k or ".partial" in k for k in s3.keys("once/store"))


@pytest.mark.slow
def test_evaluate_reads_each_bigwig_once(s3, once, tmp_path):
    """`edice evaluate` on S3 with a store (so each truth track has a model and an AVG
    evaluation) and plots (browser panels read the tracks too) fetches every truth and
    imputed bigWig about once: headers by byte range on the driver, values once in the
    task that evaluates the track."""
    import csv

    cons = once["cons"]
    truth = list(csv.DictReader(open(cons / "truth" / "targets.tsv"), delimiter="\t"))
    observed = list(csv.DictReader(open(cons / "manifest.tsv"), delimiter="\t"))
    client = s3.client()
    for t in truth:  # stand-in imputations: another cell type's track of the same assay
        src = next(o for o in observed if o["assay"] == t["assay"])
        client.upload_file(str(cons / src["path"]), s3.bucket,
                           f"once/run/bigwig/{t['cell_type']}-{t['assay']}.bigWig")
    s3.reset_counts()
    _edice(s3, "evaluate", "--truth", s3.url("once/in/truth/targets.tsv"), "--imputed",
           s3.url("once/run/bigwig"), "--store", s3.url("once/store"), "--out",
           s3.url("once/evaluation"))
    sent = s3.bytes_sent()
    served = {**{k: v for k, v in _served(s3, sent, "once/in/truth/").items()
                 if k.endswith(".bigWig")}, **_served(s3, sent, "once/run/bigwig/")}
    assert len(served) == 2 * len(truth)
    total = sum(n for n, _ in served.values()) / sum(size for _, size in served.values())
    worst = max(n / size for n, size in served.values())
    assert all(n >= size for n, size in served.values())
    assert total <= RATIO and worst <= RATIO, (total, worst)
    print(f"evaluate: {len(served)} bigWigs: served {total:.3f}x their bytes (worst "
          f"{worst:.3f}x)")
    metrics = _body(s3, "once/evaluation/metrics.tsv").decode()
    assert metrics.count("\tmodel\t") == len(truth) and metrics.count("\tAVG\t") == len(truth)
    assert "once/evaluation/report.html" in s3.keys("once/evaluation/")
