"""What every job entry point does: read ``--config``, check it, join Ray, run stages.

Submitted with ``ray job submit --working-dir . -- python jobs/<job>.py --config FILE``,
the job runs on the cluster's head node with this repository as its working folder;
``RAY_ADDRESS`` (set by the job) makes :func:`edice_dist.raycluster.init` join that
cluster. Run directly (``python jobs/<job>.py --config FILE``) it starts a private
local Ray instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code shipped with the job (the working folder) wins over an installed copy, and
# Ray workers started by a private local Ray inherit it through PYTHONPATH.
if REPO not in sys.path:
    sys.path.insert(1, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != REPO])
os.environ.setdefault("PYTHONUNBUFFERED", "1")


def _describe_cluster() -> str:
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    return (f"{int(res.get('CPU', 0))} CPUs, {gpus} GPU{'s' if gpus != 1 else ''}, "
            f"{len(ray.nodes())} node(s)")


def main(job: str, summary: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<job>.py``; returns the exit status."""
    p = argparse.ArgumentParser(prog=f"jobs/{job}.py", description=summary)
    p.add_argument("--config", required=True,
                   help="YAML or JSON job config (see jobs/example-pipeline.yaml)")
    p.add_argument("--check", action="store_true",
                   help="only load and check the config (inputs exist, outputs writable)")
    args = p.parse_args(argv)

    from edice_dist.errors import report
    from edice_dist.jobconfig import load_job_config, run_stages, stages_for
    from edice_dist.preflight import preflight
    from edice_dist.progress import log

    t0 = time.monotonic()
    try:
        cfg = load_job_config(args.config)
        stages = stages_for(job, cfg)
        log(f"job {job}: config {args.config}; stages: {', '.join(stages)}")
        for key in ("manifest", "chrom_sizes", "store", "model", "run"):
            if cfg.get(key):
                log(f"  {key:<12} {cfg[key]}")
        preflight(cfg, stages)
        log(f"preflight ok ({time.monotonic() - t0:.1f} s)")
        if args.check:
            return 0
        from edice_dist import raycluster

        raycluster.init()
        log(f"Ray: {_describe_cluster()}"
            + (f" at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else " (local)"))
        done = run_stages(cfg, stages)
    except (Exception, KeyboardInterrupt) as e:  # one paragraph, whatever failed
        return report(e, f"jobs/{job}.py", again="submit the same job again")
    log(f"job {job} done in {time.monotonic() - t0:.0f} s")
    for stage, path in done.items():
        if path:
            log(f"  {stage:<9} -> {path}")
    if "run" in cfg and "impute" in done and (cfg.get("impute") or {}).get("export", True):
        from edice_dist import runfolder

        log(f"  bigWigs   -> {runfolder.bigwig_dir(cfg['run'])}")
    return 0
