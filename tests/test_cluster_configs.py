"""The cluster configs validate: the Ray launcher configs against the JSON schema that the
installed Ray ships (and Ray's own `ray up` preparation), the KubeRay manifests against
the fields the KubeRay CRDs and operator require, the job runtime env as a Ray runtime
env that ships the code only. Each check is also shown to reject a broken copy."""

from __future__ import annotations

import copy
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"]


def _load(rel: str):
    return yaml.safe_load((REPO / rel).read_text())


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d]


# ------------------------------------------------------------------ Ray cluster launcher


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _schema_errors(cfg: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(cfg)]


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_config_matches_ray_schema(rel, ray_schema):
    assert _schema_errors(_load(rel), ray_schema) == []


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_config_survives_ray_up_preparation(rel):
    """What `ray up` does before it touches a cloud: merge the provider defaults, then
    validate the result."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(rel)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_config_has_cpu_head_and_autoscaling_gpu_workers(rel):
    cfg = _load(rel)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for n, t in types.items()
                 if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    for t in gpu_types:
        assert t["min_workers"] == 0
        assert 1 <= t["max_workers"] <= cfg["max_workers"]
    setup = " ".join(cfg["setup_commands"])
    assert "torch==" in setup and "-e ~/edice-dist" in setup
    assert cfg["file_mounts"]["~/edice-dist"] == "."
    # Token authentication stays on and every node gets the token.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    # The torch pin of the setup commands is the package's.
    pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"torch=={pin}" in setup


def _break_typo(c):
    c["max_worker"] = c.pop("max_workers")


def _break_type(c):
    next(t for t in c["available_node_types"].values() if "min_workers" in t)["min_workers"] = "0"


def _break_no_provider(c):
    del c["provider"]


def _break_no_resources(c):
    del next(iter(c["available_node_types"].values()))["resources"]


@pytest.mark.parametrize("rel", LAUNCHER)
@pytest.mark.parametrize("breaker", [_break_typo, _break_type, _break_no_provider,
                                     _break_no_resources])
def test_broken_launcher_config_fails_the_schema(rel, breaker, ray_schema):
    cfg = _load(rel)
    breaker(cfg)
    assert _schema_errors(cfg, ray_schema)


# ------------------------------------------------------------------ KubeRay manifests

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Name limits of the KubeRay operator (utils/constant.go): services get suffixes, and a
# RayJob's cluster gets 6 more characters.
_MAX_NAME = {"RayCluster": 53, "RayJob": 47}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def _string_map(value, where: str, out: list[str]) -> None:
    if not isinstance(value, dict):
        out.append(f"{where} must be a mapping")
        return
    for k, v in value.items():
        if not isinstance(v, str):  # map[string]string in the CRD
            out.append(f"{where}.{k} must be a string, got {v!r}")


def _pod_template(tpl, where: str, out: list[str]) -> None:
    containers = (((tpl or {}).get("spec") or {}).get("containers")) if isinstance(tpl, dict) else None
    if not containers:
        out.append(f"{where}.template.spec.containers must list at least one container")
        return
    for i, c in enumerate(containers):
        for key in ("name", "image"):
            if not isinstance(c.get(key), str) or not c.get(key):
                out.append(f"{where}.template.spec.containers[{i}].{key} is required")


def _cluster_spec(spec, where: str, out: list[str]) -> None:
    """RayClusterSpec: the CRD's required fields (headGroupSpec; per group template,
    rayStartParams; per worker group groupName, minReplicas, maxReplicas) and the
    operator's validation rules (ValidateRayClusterSpec)."""
    if not isinstance(spec, dict):
        out.append(f"{where} is required")
        return
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        out.append(f"{where}.headGroupSpec is required")
    else:
        if "rayStartParams" not in head:
            out.append(f"{where}.headGroupSpec.rayStartParams is required")
        else:
            _string_map(head["rayStartParams"], f"{where}.headGroupSpec.rayStartParams", out)
        _pod_template(head.get("template"), f"{where}.headGroupSpec", out)
    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        out.append(f"{where}.workerGroupSpecs must be a list")
        groups = []
    names = [g.get("groupName") for g in groups if isinstance(g, dict)]
    if len(names) != len(set(names)):
        out.append(f"{where}.workerGroupSpecs: groupName values must be unique")
    for i, g in enumerate(groups):
        w = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(g.get("groupName"), str) or not g.get("groupName"):
            out.append(f"{w}.groupName is required")
        for key in ("minReplicas", "maxReplicas", "replicas"):
            v = g.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                out.append(f"{w}.{key} must be an integer >= 0, got {v!r}")
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas")
        if all(isinstance(x, int) for x in (lo, hi, n)) and not lo <= n <= hi:
            out.append(f"{w}: need minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        if "rayStartParams" not in g:
            out.append(f"{w}.rayStartParams is required")
        else:
            _string_map(g["rayStartParams"], f"{w}.rayStartParams", out)
        _pod_template(g.get("template"), w, out)
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token" and _version(spec.get("rayVersion", "0")) < (2, 52, 0):
        out.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")


def kuberay_problems(doc: dict) -> list[str]:
    """Every missing or invalid field of a RayCluster or RayJob manifest."""
    out: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        out.append(f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    kind = doc.get("kind")
    if kind not in _MAX_NAME:
        return out + [f"kind must be RayCluster or RayJob, got {kind!r}"]
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not _DNS1035.match(name) or len(name) > _MAX_NAME[kind]:
        out.append(f"metadata.name must be a DNS-1035 label of at most {_MAX_NAME[kind]} "
                   f"characters, got {name!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return out + ["spec is required"]
    if kind == "RayCluster":
        _cluster_spec(spec, "spec", out)
        return out
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        out.append("spec.entrypoint is required")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        out.append("spec.rayClusterSpec (or clusterSelector) is required")
    elif "rayClusterSpec" in spec:
        _cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec", out)
    if not isinstance(spec.get("shutdownAfterJobFinishes"), bool):
        out.append("spec.shutdownAfterJobFinishes must be true or false")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if not isinstance(ttl, int) or ttl < 0:
        out.append("spec.ttlSecondsAfterFinished must be an integer >= 0")
    elif ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        out.append("spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline <= 0):
        out.append("spec.activeDeadlineSeconds must be a positive integer")
    if "runtimeEnvYAML" in spec:
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
            if env is not None and not isinstance(env, dict):
                out.append("spec.runtimeEnvYAML must be a YAML mapping")
        except yaml.YAMLError as e:
            out.append(f"spec.runtimeEnvYAML is not valid YAML: {e}")
    return out


def _ray_docs() -> list[tuple[str, dict]]:
    return [(rel, d) for rel in KUBERAY for d in _docs(rel) if d.get("kind") in _MAX_NAME]


@pytest.mark.parametrize("rel,doc", _ray_docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kuberay_manifest_has_required_fields(rel, doc):
    assert kuberay_problems(doc) == []


def _cluster_of(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("rel,doc", _ray_docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kuberay_cluster_is_cpu_head_with_autoscaling_gpu_group(rel, doc):
    spec = _cluster_of(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu = [g for g in spec["workerGroupSpecs"]
           if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for c in g["template"]["spec"]["containers"])]
    assert gpu, "no worker group with nvidia.com/gpu limits"
    for g in gpu:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(lim["nvidia.com/gpu"]) >= 1
    workers = [c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    images = {c["image"] for c in [head, *workers]}
    assert len(images) == 1, f"head and workers should run one image, got {images}"


def test_rayjob_runs_impute_with_a_mounted_config_that_loads(tmp_path):
    """The RayJob's entrypoint is jobs/impute.py in the image's copy of the repository,
    its --config file is the ConfigMap mounted into the head pod, and that config is a
    valid job config."""
    from edice_dist.jobconfig import load_job_config, stages_for

    docs = _docs("cluster/kuberay/rayjob.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    m = re.fullmatch(r"python (\S+)/jobs/impute\.py --config (\S+)", job["spec"]["entrypoint"])
    assert m, job["spec"]["entrypoint"]
    workdir, config_path = m.groups()
    dockerfile = (REPO / "cluster/Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(workdir)}$", dockerfile, re.M)
    assert re.search(r"^COPY .*\bjobs \./jobs$", dockerfile, re.M)
    assert (REPO / "jobs/impute.py").is_file()

    pod = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(vm for vm in pod["containers"][0]["volumeMounts"]
                 if config_path.startswith(vm["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = next(d for d in docs if d["kind"] == "ConfigMap"
              and d["metadata"]["name"] == volume["configMap"]["name"])
    key = config_path[len(mount["mountPath"].rstrip("/")) + 1:]
    (tmp_path / key).write_text(cm["data"][key])
    cfg = load_job_config(str(tmp_path / key))
    assert stages_for("impute", cfg) == ("impute",)
    assert all(cfg[k] and cfg[k].startswith("s3://") for k in ("store", "model", "run"))


def _drop(path: str):
    def f(doc):
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        del node[keys[-1]]
    return f


def _set(path: str, value):
    def f(doc):
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[keys[-1]] = value
    return f


_RC = "spec"
_RJ = "spec.rayClusterSpec"
BROKEN = [
    ("cluster/kuberay/raycluster.yaml", _set("apiVersion", "ray.io/v1alpha1"), "apiVersion"),
    ("cluster/kuberay/raycluster.yaml", _set("metadata.name", "Edice_Cluster"), "metadata.name"),
    ("cluster/kuberay/raycluster.yaml", _drop(f"{_RC}.headGroupSpec"), "headGroupSpec"),
    ("cluster/kuberay/raycluster.yaml", _drop(f"{_RC}.headGroupSpec.rayStartParams"), "rayStartParams"),
    ("cluster/kuberay/raycluster.yaml",
     _drop(f"{_RC}.headGroupSpec.template.spec.containers.0.image"), "image"),
    ("cluster/kuberay/raycluster.yaml", _drop(f"{_RC}.workerGroupSpecs.0.groupName"), "groupName"),
    ("cluster/kuberay/raycluster.yaml", _set(f"{_RC}.workerGroupSpecs.0.minReplicas", 5),
     "minReplicas <= replicas"),
    ("cluster/kuberay/raycluster.yaml", _drop(f"{_RC}.workerGroupSpecs.0.maxReplicas"), "maxReplicas"),
    ("cluster/kuberay/raycluster.yaml",
     _set(f"{_RC}.headGroupSpec.rayStartParams.num-cpus", 0), "must be a string"),
    ("cluster/kuberay/raycluster.yaml", _set(f"{_RC}.rayVersion", "2.40.0"), "rayVersion"),
    ("cluster/kuberay/rayjob.yaml", _drop("spec.entrypoint"), "entrypoint"),
    ("cluster/kuberay/rayjob.yaml", _drop("spec.rayClusterSpec"), "rayClusterSpec"),
    ("cluster/kuberay/rayjob.yaml", _drop("spec.shutdownAfterJobFinishes"), "shutdownAfterJobFinishes"),
    ("cluster/kuberay/rayjob.yaml", _set("spec.runtimeEnvYAML", "env_vars: [unclosed"), "runtimeEnvYAML"),
    ("cluster/kuberay/rayjob.yaml", _drop(f"{_RJ}.workerGroupSpecs.0.template"), "containers"),
    ("cluster/kuberay/rayjob.yaml", _set("metadata.name", "x" * 48), "metadata.name"),
]


@pytest.mark.parametrize("rel,breaker,expected", BROKEN,
                         ids=[f"{r.split('/')[-1]}-{e}" for r, _, e in BROKEN])
def test_broken_kuberay_manifest_is_rejected(rel, breaker, expected):
    doc = copy.deepcopy(next(d for d in _docs(rel) if d.get("kind") in _MAX_NAME))
    breaker(doc)
    problems = kuberay_problems(doc)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------ job runtime env


def _package(root: Path, excludes: list[str], out: Path) -> set[str]:
    from ray._private.runtime_env.packaging import create_package

    create_package(str(root), out, include_gitignore=True, excludes=excludes)
    return set(zipfile.ZipFile(out).namelist())


def test_runtime_env_is_valid_and_ships_code_only(tmp_path):
    from ray.runtime_env import RuntimeEnv

    env = _load("jobs/runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert "working_dir" not in env, "the working folder is given with --working-dir"

    # What `ray job submit --working-dir .` uploads from this repository.
    names = _package(REPO, env["excludes"], tmp_path / "repo.zip")
    for needed in ("jobs/pipeline.py", "jobs/_common.py", "jobs/runtime_env.yaml",
                   "edice_dist/__init__.py", "edice_dist/jobconfig.py"):
        assert needed in names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)
    assert (tmp_path / "repo.zip").stat().st_size < 20 * 2**20

    # Outputs a user may leave in the working folder stay behind.
    root = tmp_path / "tree"
    for rel in ("jobs/a.py", "out/store.zarr/zarr.json", "out/run/bigwig/K562-H3K27ac.bigWig",
                "x.bw", "store.partial/zarr.json", "demo/model.pt", ".venv/bin/python",
                "edice_dist/__pycache__/m.pyc", "data/t.bedGraph"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    assert _package(root, env["excludes"], tmp_path / "tree.zip") - {".gitignore"} == {"jobs/a.py"}


def test_job_files_reference_existing_scripts():
    """Every `python jobs/<x>.py` in the cluster docs and manifests exists."""
    texts = [(REPO / p).read_text() for p in [*KUBERAY, "docs/cluster.md"] if (REPO / p).exists()]
    scripts = set(re.findall(r"jobs/(\w+)\.py", "\n".join(texts)))
    assert scripts
    for s in scripts:
        assert (REPO / "jobs" / f"{s}.py").is_file(), s
    assert os.access(REPO / "jobs" / "pipeline.py", os.R_OK)
