"""A real Ray head node for tests, on 127.0.0.1 with ports and a temp folder of its own,
optionally with Ray's fake multi-node autoscaler behind it.

``RayHead(worker_node_types=...)`` is what ``ray.cluster_utils.AutoscalingCluster`` starts
(the head runs the real autoscaler with the fake multi-node provider, which starts and
stops local raylets as nodes, with any resources, fake GPUs included), without its two
problems here: ``AutoscalingCluster.start`` runs ``ray stop --force``, which kills every
Ray process of the machine (other clusters, the test session's own Ray), and the config
template it reads (``fake_multi_node/example.yaml``) is not in Ray's wheel (so the
provider is named as an external module here, which needs no template). The head is
stopped through its own PID, and anything of its cluster that outlives it is found by its
unique temp folder (every process of the cluster, fake worker nodes included, runs under
it), never by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from s3server import free_port

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
HEAD_TYPE = "ray.head.default"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's id of the head


def autoscaling_config(head_cpus: int, worker_node_types: dict, gcs_port: int,
                       idle_timeout_minutes: float) -> dict:
    """The cluster config of Ray's fake multi-node provider (as its example.yaml)."""
    return {
        "cluster_name": "edice-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
        # The fake provider named as an external module: ``fake_multinode`` would make the
        # autoscaler read fake_multi_node/example.yaml for defaults, which Ray's wheel lacks.
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                               "FakeMultiNodeProvider",
                     "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     # Worker nodes join this head (the provider's default is port 6379 of
                     # the machine's address, where another cluster may run).
                     "gcs_address": f"127.0.0.1:{gcs_port}",
                     # Autoscaler v2 (as AutoscalingCluster(autoscaler_v2=True) sets it up).
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
        "available_node_types": {
            **worker_node_types,
            HEAD_TYPE: {"resources": {"CPU": head_cpus, "GPU": 0}, "node_config": {},
                        "max_workers": 0}},
        "head_node_type": HEAD_TYPE,
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


class RayHead:
    """A real Ray head node (`ray start --head --block`) on 127.0.0.1 with ports of its
    own, in a temp folder, with token authentication. Stopped through its own PID (its
    `--block` process takes its Ray processes down), never with `ray stop`, which would
    also stop other Ray clusters on the machine.

    Parameters
    ----------
    num_cpus : CPUs of the head node.
    extra_env : environment of the head (and so of every process of the cluster).
    worker_node_types : autoscaler node types (``{"resources": {...}, "min_workers": 0,
        "max_workers": N, "node_config": {}}``): the head then runs Ray's autoscaler with
        the fake multi-node provider, which adds and removes such nodes as local raylets.
    idle_timeout_minutes : how long an idle worker node stays.
    system_config : Ray's ``--system-config`` (e.g. faster node-death detection).

    The autoscaler is Ray's v2 (``RAY_enable_autoscaler_v2``): it reconciles the provider's
    nodes with the nodes Ray sees, so a node whose raylet died is terminated at the
    provider and replaced when there is demand. v1 asks only the provider, and the fake
    provider never notices a dead raylet: it would count the lost node forever.
    """

    def __init__(self, num_cpus: int = 2, extra_env: dict | None = None,
                 worker_node_types: dict | None = None, idle_timeout_minutes: float = 0.1,
                 system_config: dict | None = None):
        import secrets
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="edray-", dir="/tmp")  # short: socket paths
        self.token = secrets.token_hex(16)
        self.ports = {k: free_port() for k in ("gcs", "dashboard", "client", "agent_http",
                                                "agent_grpc", "runtime_env", "metrics",
                                                "node_manager", "object_manager")}
        self.num_cpus = num_cpus
        self.worker_node_types = worker_node_types
        self.idle_timeout_minutes = idle_timeout_minutes
        self.system_config = system_config
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   RAY_USAGE_STATS_ENABLED="0",
                   # A one-node cluster: Ray then resolves "localhost" to 127.0.0.1 rather
                   # than to this machine's network address, so all traffic stays on loopback.
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   PATH=os.path.dirname(PY) + os.pathsep + env.get("PATH", ""))
        if worker_node_types:
            # The fake provider refuses to run without it; the autoscaler looks every second.
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                       RAY_enable_autoscaler_v2="1")
        env.update(extra_env or {})
        self.env = env  # of the cluster's processes and of the jobs that join it
        # The head alone says which fake instance it is (the provider sets these for the
        # worker nodes it starts).
        self.head_env = dict(env, **({"RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                                      "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
                                     if worker_node_types else {}))
        self.proc = None
        self.address = f"http://127.0.0.1:{self.ports['dashboard']}"
        self.gcs_address = f"127.0.0.1:{self.ports['gcs']}"

    def start(self, timeout: float = 90) -> RayHead:
        import urllib.error
        import urllib.request

        p = self.ports
        cmd = [os.path.join(os.path.dirname(PY), "ray"), "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={p['gcs']}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dashboard']}",
               f"--ray-client-server-port={p['client']}",
               f"--dashboard-agent-listen-port={p['agent_http']}",
               f"--dashboard-agent-grpc-port={p['agent_grpc']}",
               f"--runtime-env-agent-port={p['runtime_env']}",
               f"--metrics-export-port={p['metrics']}",
               f"--node-manager-port={p['node_manager']}",
               f"--object-manager-port={p['object_manager']}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--object-store-memory={200 * 2**20}", f"--temp-dir={self.tmp}",
               "--disable-usage-stats"]
        if self.worker_node_types:
            path = os.path.join(self.tmp, "autoscaling.json")
            with open(path, "w") as f:
                json.dump(autoscaling_config(self.num_cpus, self.worker_node_types, p["gcs"],
                                             self.idle_timeout_minutes), f)
            cmd.append(f"--autoscaling-config={path}")
        if self.system_config:
            cmd.append("--system-config=" + json.dumps(self.system_config, separators=(",", ":")))
        self._log = open(os.path.join(self.tmp, "head.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=self.head_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(self.address + "/api/version", timeout=2)
                return self
            except urllib.error.HTTPError:
                return self  # the dashboard answers (401 without a token): it is up
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not come up:\n{self.log()}") from None
                time.sleep(0.5)

    def api(self, path: str, timeout: float = 10) -> dict:
        """GET ``path`` of the dashboard's REST API, with the token."""
        import urllib.request

        req = urllib.request.Request(f"{self.address}{path}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def job(self, submission_id: str) -> dict | None:
        """The job's record from the dashboard's REST API (with the token); None when
        there is no such job."""
        import urllib.error

        try:
            return self.api(f"/api/jobs/{submission_id}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def state(self, kind: str) -> list[dict]:
        """Ray's State API listing of ``kind`` (``nodes``, ``actors``, ...)."""
        return self.api(f"/api/v0/{kind}?limit=1000&detail=1")["data"]["result"]["result"]

    def ray_cli(self, *args: str, env: dict | None = None, timeout: float = 120):
        return subprocess.run([os.path.join(os.path.dirname(PY), "ray"), *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=env or self.env, cwd=REPO)

    def log(self) -> str:
        try:
            return Path(self.tmp, "head.log").read_text()[-4000:]
        except OSError:
            return ""

    def autoscaler_log(self, chars: int = 6000) -> str:
        """The end of the autoscaler's own logs (``monitor.*`` of the head's session: its
        instances' state changes), for a failure message: a job that waited in vain for
        nodes says nothing about why, and the folder goes with :meth:`stop`."""
        logs = Path(self.tmp, "session_latest", "logs")
        parts = []
        for name in ("monitor.log", "monitor.err", "monitor.out"):
            try:
                text = (logs / name).read_text(errors="replace")
            except OSError:
                continue
            # The autoscaler warns about the config's legacy fields at every update.
            text = "\n".join(line for line in text.splitlines()
                              if "Dropping the empty legacy field" not in line)
            if text.strip():
                parts.append(f"--- {name} (end)\n{text[-chars:]}")
        return "\n".join(parts) or f"(no autoscaler logs under {logs})"

    def stop(self) -> None:
        import shutil
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session started above
                self.proc.wait(timeout=30)
        # Anything of this head that outlived it (found by its unique temp folder).
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path("/proc", pid, "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.tmp in cmdline:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
