"""The `edice` command: argument parsing and dispatch; the work lives in one module per verb.

Modules are imported only when their subcommand runs, so `edice --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from . import __version__
from .errors import EdiceError


def _overrides(extra: list[str]) -> dict[str, str]:
    """``--KEY=VALUE`` (or ``--KEY VALUE``) pairs left over by argparse."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        a = extra[i]
        if not a.startswith("--"):
            raise EdiceError(f"Unexpected argument {a!r}. Config overrides look like --lr=1e-4.")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            k, v = a[2:], extra[i + 1]
            i += 1
        else:
            k, v = a[2:], "true"
        out[k.replace("-", "_")] = v
        i += 1
    return out


def cmd_simulate(a, extra):
    from .simulate import SimConfig, simulate

    cfg = SimConfig.from_overrides({"seed": str(a.seed), "individuals": str(a.individuals),
                                    **_overrides(extra)})
    simulate(a.out_dir, cfg)


def cmd_ingest(a, extra):
    from .ingest import ingest

    ingest(a.manifest, a.chrom_sizes, a.out, force=a.force, chroms=a.chroms,
           chunk_bins=a.chunk_bins, dtype=a.dtype, workers=a.workers)


def cmd_info(a, extra):
    from .info import describe

    print(describe(a.path))


def cmd_train(a, extra):
    from .train import load_config, train

    cfg = load_config(a.config, _overrides(extra))
    train(a.store, a.out, cfg, resume=a.resume)


def cmd_finetune(a, extra):
    from .train import finetune

    finetune(a.model, a.store, a.out, config_file=a.config, overrides=_overrides(extra),
             resume=a.resume)


def cmd_impute(a, extra):
    from .impute import impute

    impute(a.store, a.model, a.out, targets=a.targets, chroms=a.chroms, force=a.force,
           workers=a.workers, gpus=a.gpus, space=a.space, export=not a.no_export,
           batch_bins=a.batch_bins, dtype=a.dtype)


def cmd_export(a, extra):
    from .export import export

    export(a.run_dir, space=a.space, force=a.force)


def cmd_evaluate(a, extra):
    from .evaluate import evaluate

    evaluate(a.truth, a.imputed, store=a.store, out=a.out, space=a.space, plots=not a.no_plots)


def cmd_benchmark_quality(a, extra):
    from .pipeline import run_pipeline

    run_pipeline(a.out_dir, seed=a.seed, overrides=_overrides(extra),
                 demo_model=not a.paper_model)


def cmd_pipeline(a, extra):
    from .pipeline import run_pipeline

    run_pipeline(a.out, seed=a.seed, overrides=_overrides(extra), manifest=a.manifest,
                 chrom_sizes=a.chrom_sizes, truth=a.truth, demo_model=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edice",
        description="Genome-scale epigenomic imputation with eDICE on Ray.",
    )
    p.add_argument("--version", action="version", version=f"edice-dist {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="write a synthetic consortium (bigWigs, manifest, truth)")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--individuals", type=int, default=0,
                   help="number of individuals (0: a consortium of cell types only)")
    s.set_defaults(func=cmd_simulate, extras=True)

    s = sub.add_parser("ingest", help="build the track store from a manifest of bigWigs")
    s.add_argument("manifest")
    s.add_argument("--chrom-sizes", required=True)
    s.add_argument("--out", required=True, help="store path or URL")
    s.add_argument("--force", action="store_true", help="replace a different store at --out")
    s.add_argument("--chroms", nargs="+", help="chromosomes to use (default: all in chrom.sizes)")
    s.add_argument("--chunk-bins", type=int, default=None)
    s.add_argument("--dtype", default=None, choices=["float16", "float32"])
    s.add_argument("--workers", type=int, default=None, help="parallel ingest tasks")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("info", help="describe a store, a model folder or a run folder")
    s.add_argument("path")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="train eDICE on a store (Ray Train)",
                       epilog="Config keys may be set with --KEY=VALUE, e.g. --epochs=5 --lr=1e-4.")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True, help="model folder")
    s.add_argument("--config", help="JSON or YAML file of config keys")
    s.add_argument("--resume", action="store_true", help="continue a run in --out")
    s.set_defaults(func=cmd_train, extras=True)

    s = sub.add_parser("finetune", help="transfer learning from a trained model (SPEC 2.7)")
    s.add_argument("--model", required=True)
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--config")
    s.add_argument("--resume", action="store_true")
    s.set_defaults(func=cmd_finetune, extras=True)

    s = sub.add_parser("impute", help="genome-wide imputation, then export to bigWig")
    s.add_argument("--store", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--targets", help="TSV with cell_type, assay; or cell:assay,cell:assay")
    s.add_argument("--chroms", nargs="+")
    s.add_argument("--force", action="store_true", help="restart a run made with other settings")
    s.add_argument("--workers", type=int, default=None, help="number of imputation actors")
    s.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all Ray has)")
    s.add_argument("--batch-bins", type=int, default=None)
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (default: bfloat16 where the device multiplies it fast)")
    s.add_argument("--space", choices=["pval", "arcsinh"], default="pval")
    s.add_argument("--no-export", action="store_true", help="skip the bigWig export")
    s.set_defaults(func=cmd_impute)

    s = sub.add_parser("export", help="write the bigWigs of an imputation run (the reducer)")
    s.add_argument("run_dir")
    s.add_argument("--space", choices=["pval", "arcsinh"], default="pval")
    s.add_argument("--force", action="store_true", help="rewrite bigWigs that exist")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("evaluate", help="metrics of imputed tracks against the truth")
    s.add_argument("--truth", required=True, help="manifest of truth tracks (with peaks)")
    s.add_argument("--imputed", required=True, help="folder of imputed bigWigs")
    s.add_argument("--store", help="track store for the AVG / TrackAVG baselines")
    s.add_argument("--out", help="folder for metrics.tsv, JSON and plots")
    s.add_argument("--space", choices=["arcsinh", "pval"], default="arcsinh")
    s.add_argument("--no-plots", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("benchmark-quality",
                       help="simulate, train, impute held-out tracks and evaluate them")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--paper-model", action="store_true",
                   help="train the paper's full-size model instead of the laptop demo size")
    s.set_defaults(func=cmd_benchmark_quality, extras=True)

    s = sub.add_parser("pipeline", help="ingest, train, impute and export a manifest in one go",
                       epilog="Stage options: --train.KEY=VALUE, --impute.KEY=VALUE.")
    s.add_argument("--manifest", required=True)
    s.add_argument("--chrom-sizes", required=True)
    s.add_argument("--out", required=True, help="folder for store/, model/, run/")
    s.add_argument("--truth", help="truth manifest to evaluate against at the end")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_pipeline, extras=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "extras", False):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        args.func(args, extra)
    except EdiceError as e:
        if args.debug:
            traceback.print_exc()
        print(f"edice {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edice {args.command}: interrupted; re-run the same command to resume.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
