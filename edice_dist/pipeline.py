"""The whole job: (simulate ->) ingest -> train -> impute -> export (-> evaluate).

`edice benchmark-quality OUT_DIR` and the README's main command run it on a simulated
consortium; `edice pipeline` runs it on a user's manifest. Every stage resumes, so a
re-run after an interruption continues where it stopped.
"""

from __future__ import annotations

import time

from . import storage
from .errors import InputError
from .progress import log

# A model small enough to train in minutes on a laptop CPU; the paper's model is the
# `edice train` default. Chosen on the default simulated consortium (BENCHMARKS.md).
DEMO_TRAIN = {
    "embed_dim": "64",
    "ffn_dim": "64",
    "decoder_hidden": "256",
    "lr": "1e-3",
    "epochs": "6",
    "bins_per_epoch": "40000",
    "batch_size": "256",
    "patience": "2",
    "workers": "2",
}

_PREFIXES = ("sim.", "train.", "impute.")


def _split_overrides(overrides: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {p[:-1]: {} for p in _PREFIXES}
    for k, v in overrides.items():
        for p in _PREFIXES:
            if k.startswith(p):
                out[p[:-1]][k[len(p):]] = v
                break
        else:
            raise InputError(
                f"Unknown option --{k}. Pipeline options are prefixed by stage: "
                "--sim.KEY=VALUE, --train.KEY=VALUE, --impute.KEY=VALUE "
                "(e.g. --train.epochs=3)."
            )
    return out


def run_pipeline(
    out_dir: str,
    seed: int = 0,
    overrides: dict[str, str] | None = None,
    manifest: str | None = None,
    chrom_sizes: str | None = None,
    truth: str | None = None,
    demo_model: bool = True,
) -> dict:
    """Run every stage into ``out_dir``; return the paths of what was made.

    Without ``manifest``, a consortium is simulated into ``OUT_DIR/consortium`` and its
    held-out truth is evaluated at the end.

    Layout: ``consortium/`` (simulated input), ``store/`` (track store), ``model/``,
    ``run/`` (imputation; bigWigs in ``run/bigwig/``), ``evaluation/``.
    """
    from . import raycluster

    opts = _split_overrides(overrides or {})
    out_dir = storage.absolute(out_dir)
    manifest, chrom_sizes, truth = map(storage.absolute, (manifest, chrom_sizes, truth))
    t0 = time.monotonic()
    n = 3 + (manifest is None) + bool(truth or manifest is None)
    step = 0
    paths: dict[str, str] = {}
    raycluster.init()

    if manifest is None:
        from .simulate import SimConfig, simulate

        step += 1
        log(f"=== [{step}/{n}] simulate a consortium")
        sim_dir = storage.join(out_dir, "consortium")
        simulate(sim_dir, SimConfig.from_overrides({"seed": str(seed), **opts["sim"]}))
        manifest = storage.join(sim_dir, "manifest.tsv")
        chrom_sizes = storage.join(sim_dir, "chrom.sizes")
        truth = truth or storage.join(sim_dir, "truth", "targets.tsv")
    elif chrom_sizes is None:
        raise InputError("--chrom-sizes is required with --manifest.")

    from .ingest import ingest

    step += 1
    log(f"=== [{step}/{n}] ingest {manifest}")
    paths["store"] = storage.join(out_dir, "store")
    ingest(manifest, chrom_sizes, paths["store"])

    from .train import load_config, train

    step += 1
    log(f"=== [{step}/{n}] train")
    paths["model"] = storage.join(out_dir, "model")
    train_over = {"seed": str(seed), **(DEMO_TRAIN if demo_model else {}), **opts["train"]}
    cfg = load_config(None, train_over)
    train(paths["store"], paths["model"], cfg, resume=storage.exists(paths["model"]))

    from .impute import impute

    step += 1
    log(f"=== [{step}/{n}] impute and export")
    paths["run"] = storage.join(out_dir, "run")
    imp = opts["impute"]
    impute(paths["store"], paths["model"], paths["run"],
           targets=imp.get("targets"),
           batch_bins=int(imp["batch_bins"]) if "batch_bins" in imp else None,
           workers=int(imp["workers"]) if "workers" in imp else None)
    paths["bigwig"] = storage.join(paths["run"], "bigwig")

    if truth:
        from .evaluate import evaluate

        step += 1
        log(f"=== [{step}/{n}] evaluate against the held-out truth")
        paths["evaluation"] = storage.join(out_dir, "evaluation")
        evaluate(truth, paths["bigwig"], store=paths["store"], out=paths["evaluation"])

    log(f"=== done in {time.monotonic() - t0:.0f} s")
    log(f"bigWigs:      {paths['bigwig']} (listed in {storage.join(paths['bigwig'], 'manifest.tsv')})")
    log(f"model:        {paths['model']}")
    if "evaluation" in paths:
        log(f"evaluation:   {storage.join(paths['evaluation'], 'metrics.tsv')} and plots in "
            f"{paths['evaluation']}")
    return paths
