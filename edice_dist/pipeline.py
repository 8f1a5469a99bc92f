"""The whole job: (simulate ->) ingest -> train -> impute -> export (-> evaluate).

`edice benchmark-quality OUT_DIR` and the README's main command run it on a simulated
consortium; `edice pipeline` runs it on a user's manifest. Every stage runs through the
stage runner (:mod:`edice_dist.stages`) with the options given as
``--<stage>.KEY=VALUE``; all of them are checked before the first stage starts. Every
stage resumes, so a re-run after an interruption continues where it stopped.
"""

from __future__ import annotations

import time

from . import runfolder, stages, storage
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

PREFIXES = {"sim": "simulate", "simulate": "simulate", "ingest": "ingest", "train": "train",
            "impute": "impute", "evaluate": "evaluate"}
"""Option prefixes (``--sim.seed=3``) and the stage each names."""
_SHOWN = {"simulate": "sim"}  # the documented prefix where it differs from the stage name


def _prefix(stage: str) -> str:
    return f"--{_SHOWN.get(stage, stage)}."


def split_options(overrides: dict[str, str], run: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``{stage: {key: value}}`` of ``--STAGE.KEY=VALUE`` overrides for the stages in ``run``.

    Raises
    ------
    InputError
        An option without a known stage prefix, or one for a stage this pipeline does not
        run (such a stage's options would be ignored).
    """
    out: dict[str, dict[str, str]] = {s: {} for s in run}
    for k, v in overrides.items():
        head, dot, key = k.partition(".")
        stage = PREFIXES.get(head) if dot else None
        if stage is None:
            raise InputError(
                f"Unknown option --{k}. Pipeline options are prefixed by stage: "
                "--sim.KEY=VALUE, --ingest.KEY=VALUE, --train.KEY=VALUE, --impute.KEY=VALUE, "
                "--evaluate.KEY=VALUE (e.g. --train.epochs=3)."
            )
        if stage not in run:
            why = ("it simulates only without --manifest" if stage == "simulate"
                   else "it evaluates only with --truth or a simulated consortium")
            raise InputError(f"Option --{k} is for the {stage} stage, which this pipeline does "
                             f"not run ({why}). Its stages are: {', '.join(run)}.")
        out[stage][key] = v
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

    Raises
    ------
    InputError
        Before any stage starts, for a stage option that is unknown, of the wrong type or
        for a stage that does not run (the message lists the valid ones).
    """
    from . import raycluster

    out_dir = storage.absolute(out_dir)
    manifest, chrom_sizes, truth = map(storage.absolute, (manifest, chrom_sizes, truth))
    if manifest is not None and chrom_sizes is None:
        raise InputError("--chrom-sizes is required with --manifest.")
    sim_dir = storage.join(out_dir, "consortium")
    if manifest is None:
        truth = truth or storage.join(sim_dir, "truth", "targets.tsv")
    run = (("simulate",) if manifest is None else ()) + ("ingest", "train", "impute") + \
        (("evaluate",) if truth else ())
    paths = {"store": storage.join(out_dir, "store"), "model": storage.join(out_dir, "model"),
             "run": storage.join(out_dir, "run")}
    paths["bigwig"] = runfolder.bigwig_dir(paths["run"])

    opts = split_options(overrides or {}, run)
    opts["train"] = {"seed": str(seed), **(DEMO_TRAIN if demo_model else {}),
                     "resume": storage.exists(paths["model"]), **opts["train"]}
    if "simulate" in run:
        opts["simulate"] = {"seed": str(seed), **opts["simulate"]}
    # Every option is checked (and the training config file read) before any work.
    prepared = {s: stages.prepare(s, opts[s], prefix=_prefix(s)) for s in run}

    t0 = time.monotonic()
    raycluster.init()
    for step, name in enumerate(run, 1):
        if name == "simulate":
            log(f"=== [{step}/{len(run)}] simulate a consortium")
            stages.run_stage(name, {"out": sim_dir}, prepared[name])
            manifest = storage.join(sim_dir, "manifest.tsv")
            chrom_sizes = storage.join(sim_dir, "chrom.sizes")
        elif name == "ingest":
            log(f"=== [{step}/{len(run)}] ingest {manifest}")
            stages.run_stage(name, {"manifest": manifest, "chrom_sizes": chrom_sizes,
                                    "out": paths["store"]}, prepared[name])
        elif name == "train":
            log(f"=== [{step}/{len(run)}] train")
            stages.run_stage(name, {"store": paths["store"], "out": paths["model"]},
                             prepared[name])
        elif name == "impute":
            log(f"=== [{step}/{len(run)}] impute and export")
            stages.run_stage(name, {"store": paths["store"], "model": paths["model"],
                                    "out": paths["run"]}, prepared[name])
        else:
            log(f"=== [{step}/{len(run)}] evaluate against the held-out truth")
            paths["evaluation"] = storage.join(out_dir, "evaluation")
            stages.run_stage(name, {"truth": truth, "imputed": paths["bigwig"],
                                    "store": paths["store"], "out": paths["evaluation"]},
                             prepared[name])

    log(f"=== done in {time.monotonic() - t0:.0f} s")
    log(f"bigWigs:      {paths['bigwig']} (listed in "
        f"{storage.join(paths['bigwig'], runfolder.BIGWIG_MANIFEST)})")
    log(f"model:        {paths['model']}")
    if "evaluation" in paths:
        log(f"evaluation:   {storage.join(paths['evaluation'], 'metrics.tsv')} and plots in "
            f"{paths['evaluation']}")
        log(f"report:       {storage.join(paths['evaluation'], 'report.html')} (one page: "
            "tables, plots, provenance)")
    hub_txt = storage.join(paths["bigwig"], "hub.txt")
    if storage.exists(hub_txt):
        log(f"track hub:    {hub_txt} (serve the folder, load that URL in the UCSC browser or "
            "IGV)")
    return paths
