"""The `edice` command: argument parsing only. Every stage subcommand is built from its
declaration in :mod:`edice_dist.stages` and runs through :func:`stages.run_stage`; the
work lives in one module per verb.

Stage modules are imported only when their subcommand runs, so `edice --help` stays fast.
Option values reach the stage as text and are typed by :mod:`edice_dist.config`, so that a
bad value is a one-paragraph error like every other.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from . import __version__, config, stages
from .errors import EdiceError, report


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


# ----------------------------------------------------------------------------- stages


def _metavar(typ, flag: str) -> str:
    inner, _ = config.unwrap(typ)
    if typing.get_origin(inner) is typing.Literal:
        return "{" + ",".join(typing.get_args(inner)) + "}"
    return {int: "N", float: "X"}.get(inner, flag.lstrip("-").replace("-", "_").upper())


def _add_option(p: argparse.ArgumentParser, f: dataclasses.Field, typ, help_: str) -> None:
    """One option as a flag; values stay text (``store_const`` for booleans)."""
    flag = stages.flag(f)
    inner, _ = config.unwrap(typ)
    if inner is bool and f.default is True:
        p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const",
                       const=False, default=argparse.SUPPRESS, help=f"do not {help_}")
    elif inner is bool:
        p.add_argument(flag, dest=f.name, action="store_const", const=True,
                       default=argparse.SUPPRESS, help=help_)
    elif typing.get_origin(inner) is list:
        p.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, help=help_)
    else:
        default = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, dest=f.name, metavar=_metavar(typ, flag), default=argparse.SUPPRESS,
                       help=help_ + default)


def _add_stage(sub, st: stages.Stage) -> None:
    # No abbreviated flags: --gpu must not pass for --gpus here while a job config's
    # `gpu:` is refused.
    s = sub.add_parser(st.name, help=st.help, epilog=st.epilog or None, allow_abbrev=False,
                       prog=f"edice {st.command}")
    for a in st.paths:
        if a.flag.startswith("--"):
            s.add_argument(a.flag, dest=a.name, required=a.required, default=None, help=a.help)
        else:
            s.add_argument(a.name, metavar=a.flag, help=a.help)
    types = config.field_types(st.options)
    for f in dataclasses.fields(st.options):
        _add_option(s, f, types[f.name], f.metadata.get("help", ""))
    if st.flags:
        opened = stages.open_config(st)
        types = config.field_types(opened)
        helps = dict(st.flags)
        for f in dataclasses.fields(opened):
            if f.name in helps:
                _add_option(s, f, types[f.name], helps[f.name])
    s.set_defaults(func=_run_stage, stage=st, extras=st.open is not None)


def _run_stage(a, extra) -> None:
    st = a.stage
    names = {f.name for f in dataclasses.fields(st.options)} | dict(st.flags).keys()
    options = {k: v for k, v in vars(a).items() if k in names}
    stages.run_stage(st.name, {p.name: getattr(a, p.name) for p in st.paths},
                     {**options, **_overrides(extra)}, prefix="--")


# ----------------------------------------------------------------------------- whole job


def cmd_benchmark_quality(a, extra):
    from .pipeline import run_pipeline

    run_pipeline(a.out_dir, seed=a.seed, overrides=_overrides(extra),
                 demo_model=not a.paper_model)


def cmd_pipeline(a, extra):
    from .pipeline import run_pipeline

    run_pipeline(a.out, seed=a.seed, overrides=_overrides(extra), manifest=a.manifest,
                 chrom_sizes=a.chrom_sizes, truth=a.truth, demo_model=False)


def cmd_serve(a, extra):
    from .serve import serve

    serve(a.path, host=a.host, port=a.port)


_GROUPS = {"personal": "personalised imputation of individuals (ENTEx-like): leave-one-out, "
                       "leave-tissue-out"}

_STAGE_OPTIONS = ("Stage options: --sim.KEY=VALUE, --ingest.KEY=VALUE, --train.KEY=VALUE, "
                  "--impute.KEY=VALUE, --evaluate.KEY=VALUE (the options of `edice <stage>`).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edice",
        description="Genome-scale epigenomic imputation with eDICE on Ray.",
    )
    p.add_argument("--version", action="version", version=f"edice-dist {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="print the full trace of an error (it is also written to a log file "
                        "named in the message; EDICE_LOG_DIR sets its folder)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for st in stages.STAGES.values():
        if st.group and st.group not in groups:
            g = sub.add_parser(st.group, help=_GROUPS[st.group])
            groups[st.group] = g.add_subparsers(dest="workflow", required=True,
                                                metavar="WORKFLOW")
        _add_stage(groups[st.group] if st.group else sub, st)

    s = sub.add_parser("benchmark-quality",
                       help="simulate, train, impute held-out tracks and evaluate them",
                       epilog=_STAGE_OPTIONS)
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--paper-model", action="store_true",
                   help="train the paper's full-size model instead of the laptop demo size")
    s.set_defaults(func=cmd_benchmark_quality, extras=True)

    s = sub.add_parser("pipeline", help="ingest, train, impute and export a manifest in one go",
                       epilog=_STAGE_OPTIONS)
    s.add_argument("--manifest", required=True)
    s.add_argument("--chrom-sizes", required=True)
    s.add_argument("--out", required=True, help="folder for store/, model/, run/")
    s.add_argument("--truth", help="truth manifest to evaluate against at the end")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_pipeline, extras=True)

    s = sub.add_parser("serve", help="serve a run's track hub over HTTP for IGV (byte "
                                     "ranges, CORS)")
    s.add_argument("path", help="a run folder (its bigwig/ is served) or any folder")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this "
                                                       "machine only)")
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "extras", False):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        args.func(args, extra)
    except (Exception, KeyboardInterrupt) as e:  # one paragraph, whatever failed
        st = getattr(args, "stage", None)
        return report(e, f"edice {st.command if st else args.command}", debug=args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
