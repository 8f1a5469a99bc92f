"""The stage runner: the one entry point through which every stage of edice runs.

The command line (``edice <stage>``), the whole job (``edice pipeline``,
``edice benchmark-quality``: :mod:`edice_dist.pipeline`) and the cluster jobs
(``jobs/*.py``: :mod:`edice_dist.jobconfig`) all call :func:`run_stage`. Each stage
declares once, here, its paths (what it reads and writes), its options (a dataclass:
name, type, default, help) and how it runs. Options arrive as text (a command line) or
typed (a job config), and :func:`prepare` checks and types them with
:mod:`edice_dist.config`: so an option is honoured by every caller or refused by every
caller, with the list of the valid ones.

Some stages are open: ``simulate`` also takes every :class:`~edice_dist.simulate.SimConfig`
setting, and ``train``/``finetune`` and the personalised-imputation workflows
(``edice personal leave-one-out`` / ``leave-tissue-out``, whose stages are grouped under
``personal``) every :class:`~edice_dist.trainconfig.TrainConfig` key (the modules that
define those are imported only when such a stage is prepared, so that ``edice --help``
stays fast).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from . import config, storage
from .config import Source, option
from .errors import EdiceError, InputError, explain
from .hub import DEFAULT_EMAIL
from .spaces import Space

if TYPE_CHECKING:  # importing it means importing torch: only when a train stage runs
    from .trainconfig import TrainConfig

# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class IngestOptions:
    chroms: list[str] | None = option(None, "chromosomes to use (default: all in chrom.sizes)")
    chunk_bins: int | None = option(None, "bins per store chunk", minimum=1)
    dtype: Literal["float16", "float32"] | None = option(None, "store dtype (default float16)")
    workers: int | None = option(None, "parallel ingest tasks", minimum=1)
    force: bool = option(False, "replace a different store at --out")


@dataclass(frozen=True)
class TrainOptions:
    """What ``train`` and ``finetune`` take besides the training config keys."""

    config_file: str | None = option(None, "JSON or YAML file of config keys", flag="--config",
                                     path=True)
    resume: bool = option(False, "continue a run in --out; with a larger epochs, train a "
                                 "finished run further")


@dataclass(frozen=True)
class HubOptions:
    """The track hub beside the bigWigs: written by ``export``, so by ``impute`` too."""

    hub: bool = option(True, "write a UCSC track hub (hub.txt, genomes.txt, trackDb.txt) "
                             "beside the bigWigs")
    genome: str | None = option(None, "UCSC assembly of the hub: hg38, hg19, mm10, ... "
                                      "(default: recognised from the chromosome sizes, "
                                      "else hg38)")
    hub_observed: Literal["none", "link", "copy"] = option(
        "none", "put the store's observed bigWigs in the hub too: link them (by URL or "
                "symbolic link) or copy them into bigwig/observed/")
    hub_email: str = option(DEFAULT_EMAIL, "contact address in hub.txt (the UCSC format "
                                           "requires one)")


@dataclass(frozen=True)
class _ImputeOwn:
    targets: str | None = option(None, "TSV with cell_type, assay; or cell:assay,cell:assay")
    chroms: list[str] | None = option(None, "chromosomes to impute (default: all of the store's)")
    force: bool = option(False, "restart a run made with other settings")
    workers: int | None = option(None, "number of imputation actors", minimum=1)
    gpus: int | None = option(None, "GPUs to use (default: all Ray has; 0: CPU actors)",
                              minimum=0)
    batch_bins: int | None = option(None, "bins per forward batch", minimum=1)
    uncertainty: int = option(0, "Monte Carlo dropout samples per bin: writes a spread bigWig "
                                 "per target beside it (0: none; 8 is a good start)", minimum=0)
    dtype: Literal["bfloat16", "float32"] | None = option(
        None, "compute dtype (default: bfloat16 where the device multiplies it fast)")
    space: Space = option("pval", "bigWig values: -log10 p or arcsinh(-log10 p)")
    export: bool = option(True, "export the bigWigs at the end")


@dataclass(frozen=True)
class _ExportOwn:
    space: Space = option("pval", "bigWig values: -log10 p or arcsinh(-log10 p)")
    force: bool = option(False, "rewrite bigWigs that exist (needed to change --space)")
    workers: int | None = option(None, "concurrent export tasks (default: Ray's CPUs)",
                                 minimum=1)


# A dataclass takes the fields of its bases from the last base to the first: the stage's
# own options come first (in --help and in messages), the hub's after them.


@dataclass(frozen=True)
class ImputeOptions(HubOptions, _ImputeOwn):
    pass


@dataclass(frozen=True)
class ExportOptions(HubOptions, _ExportOwn):
    pass


@dataclass(frozen=True)
class EvaluateOptions:
    space: Space = option("arcsinh", "space of the metrics (the paper's: arcsinh)")
    plots: bool = option(True, "write the PNG plots")


@dataclass(frozen=True)
class _PersonalOwn:
    donors: list[str] | None = option(None, "individuals to impute (default: every one)")
    cell_types: list[str] | None = option(None, "hide only tracks of these cell types "
                                                 "(tissues)")
    models: list[str] | None = option(None, "models to train and compare (default: all): "
                                             "finetuned (the others model fine-tuned on the "
                                             "donor), others (trained on the other donors "
                                             "only), alldonors (trained on all but the hidden "
                                             "tracks)")
    finetune_lr: float = option(1e-4, "learning rate of the fine-tuning")
    finetune_epochs: int = option(10, "epochs of the fine-tuning", minimum=1)
    workers: int | None = option(None, "units at once (default: one per CPU Ray has, or "
                                       "per GPU)", minimum=1)
    gpus: int | None = option(None, "GPUs for training (default: all Ray has; 0: CPUs)",
                              minimum=0)
    plots: bool = option(True, "write the PNG plots")
    force: bool = option(False, "start over a folder that holds a run of other settings")
    config_file: str | None = option(None, "JSON or YAML file of training config keys",
                                     flag="--config", path=True)


@dataclass(frozen=True)
class LeaveOneOutOptions(_PersonalOwn):
    assays: list[str] | None = option(None, "hide only tracks of these assays")
    folds: int | None = option(None, "hide each donor's tracks in this many seeded folds "
                                     "instead of one at a time (2 models per fold instead "
                                     "of 2 per track)", minimum=2)


@dataclass(frozen=True)
class LeaveTissueOutOptions(_PersonalOwn):
    pass


@dataclass(frozen=True)
class PersonalRequest:
    """A prepared personal workflow: its options and the training config."""

    options: object
    config: TrainConfig


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class TrainRequest:
    """A prepared ``train`` stage: the loaded config and whether to train further."""

    config: TrainConfig
    resume: bool


@dataclass(frozen=True)
class FinetuneRequest:
    """A prepared ``finetune`` stage; the config loads on top of the base model's."""

    config_file: str | None
    overrides: dict
    resume: bool


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class PathArg:
    """A path a stage reads or writes: ``flag`` is ``--name`` or a positional's name."""

    name: str
    flag: str
    help: str
    required: bool = True


@dataclass(frozen=True)
class Stage:
    """One stage: its paths, its options and how it runs.

    Attributes
    ----------
    options : the dataclass of the stage's own options.
    run : ``run(paths, prepared options)``, importing the stage's module when called.
    noun : how messages name one option and several (``impute option``, ``options``).
    open : ``simulate`` or ``train``: the stage also takes that config's keys.
    flags : open keys that get their own flag in ``edice <stage> --help``, with its help.
    """

    name: str
    help: str
    paths: tuple[PathArg, ...]
    options: type
    run: Callable[[dict, object], object]
    noun: tuple[str, str] = ("option", "options")
    open: str | None = None
    flags: tuple[tuple[str, str], ...] = ()
    epilog: str = ""
    group: str | None = None  # a command of its own under ``edice <group>``

    @property
    def command(self) -> str:
        """The words after ``edice``: ``train``, ``personal leave-one-out``."""
        return f"{self.group} {self.name}" if self.group else self.name


def _simulate(p, cfg):
    from .simulate import simulate

    return simulate(p["out"], cfg)


def _ingest(p, o):
    from .ingest import ingest

    return ingest(p["manifest"], p["chrom_sizes"], p["out"], **dataclasses.asdict(o))


def _info(p, o):
    from .info import describe

    text = describe(p["path"])
    print(text)
    return text


def _train(p, req):
    from .train import train

    return train(p["store"], p["out"], req.config, resume=req.resume)


def _finetune(p, req):
    from .train import finetune

    return finetune(p["model"], p["store"], p["out"], config_file=req.config_file,
                    overrides=req.overrides, resume=req.resume)


def _impute(p, o):
    from .impute import impute

    return impute(p["store"], p["model"], p["out"], **dataclasses.asdict(o))


def _export(p, o):
    from .export import export

    return export(p["run"], **dataclasses.asdict(o))


def _evaluate(p, o):
    from .evaluate import PARALLEL_MIN_TRACKS, evaluate

    return evaluate(p["truth"], p["imputed"], store=p.get("store"), out=p.get("out"),
                    start_ray_from=PARALLEL_MIN_TRACKS, **dataclasses.asdict(o))


def _personal(workflow: str):
    def run(p, req):
        from .personal import run_workflow

        return run_workflow(workflow, p["store"], p["out"], req.options, req.config,
                            truth=p.get("truth"))

    return run


_TRAIN_EPILOG = "Config keys may be set with --KEY=VALUE, e.g. --epochs=5 --lr=1e-4."
_PERSONAL_PATHS = (
    PathArg("store", "--store", "track store whose manifest names individuals"),
    PathArg("out", "--out", "folder for the models, metrics, plots and report"),
    PathArg("truth", "--truth", "table of peak BEDs per observed track (cell_type assay path "
                                "individual peaks [person_peaks]; a simulation's "
                                "truth/observed.tsv); default: peaks called from the store",
            False))
_PERSONAL_EPILOG = ("Training config keys of the models (--KEY=VALUE, e.g. --epochs=5 "
                    "--embed_dim=64) are those of `edice train`; fine-tuning takes them too, "
                    "with --finetune-lr and --finetune-epochs.")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("simulate", "write a synthetic consortium (bigWigs, manifest, truth)",
          (PathArg("out", "out_dir", "folder for the consortium"),),
          NoOptions, _simulate, ("simulate setting", "settings"), open="simulate",
          flags=(("seed", "master seed: the same settings and seed give the same files"),
                 ("individuals", "number of individuals (0: a consortium of cell types only)")),
          epilog="Simulation settings may be set with --KEY=VALUE, e.g. --n_cell_types=20."),
    Stage("ingest", "build the track store from a manifest of bigWigs",
          (PathArg("manifest", "manifest", "TSV with cell_type, assay, path"),
           PathArg("chrom_sizes", "--chrom-sizes", "two-column chrom.sizes file"),
           PathArg("out", "--out", "store path or URL")),
          IngestOptions, _ingest, ("ingest option", "options")),
    Stage("info", "describe a store, a model folder or a run folder",
          (PathArg("path", "path", "a store, model folder or run folder"),),
          NoOptions, _info, ("info option", "options")),
    Stage("train", "train eDICE on a store (Ray Train)",
          (PathArg("store", "--store", "track store"), PathArg("out", "--out", "model folder")),
          TrainOptions, _train, ("config key", "keys"), open="train", epilog=_TRAIN_EPILOG),
    Stage("finetune", "transfer learning from a trained model (SPEC 2.7)",
          (PathArg("model", "--model", "the trained base model's folder"),
           PathArg("store", "--store", "track store of the new data"),
           PathArg("out", "--out", "folder for the fine-tuned model")),
          TrainOptions, _finetune, ("config key", "keys"), open="train", epilog=_TRAIN_EPILOG),
    Stage("impute", "genome-wide imputation, then export to bigWig",
          (PathArg("store", "--store", "track store"), PathArg("model", "--model", "model folder"),
           PathArg("out", "--out", "run folder")),
          ImputeOptions, _impute, ("impute option", "options")),
    Stage("export", "write the bigWigs of an imputation run (the reducer)",
          (PathArg("run", "run_dir", "the run folder of edice impute"),),
          ExportOptions, _export, ("export option", "options")),
    Stage("evaluate", "metrics of imputed tracks against the truth",
          (PathArg("truth", "--truth", "manifest of truth tracks (with peaks)"),
           PathArg("imputed", "--imputed", "folder of imputed bigWigs"),
           PathArg("store", "--store", "track store for the AVG / TrackAVG baselines", False),
           PathArg("out", "--out", "folder for metrics.tsv, JSON and plots", False)),
          EvaluateOptions, _evaluate, ("evaluate option", "options")),
    Stage("leave-one-out", "hide each observed track of a donor in turn and impute it: "
                           "fine-tuned vs other-donor and all-donor models, AVG, TrackAVG",
          _PERSONAL_PATHS, LeaveOneOutOptions, _personal("leave-one-out"),
          ("option", "options"), open="train", epilog=_PERSONAL_EPILOG, group="personal"),
    Stage("leave-tissue-out", "hide every track of one tissue of a donor and impute them: "
                              "fine-tuned vs other-donor and all-donor models, AVG, TrackAVG",
          _PERSONAL_PATHS, LeaveTissueOutOptions, _personal("leave-tissue-out"),
          ("option", "options"), open="train", epilog=_PERSONAL_EPILOG, group="personal"),
)}


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of an option field: ``--chunk-bins`` for ``chunk_bins``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}") from None


def open_config(st: Stage) -> type | None:
    """The config dataclass whose keys an open stage also takes (imports its module)."""
    if st.open == "simulate":
        from .simulate import SimConfig

        return SimConfig
    if st.open == "train":
        from .trainconfig import TrainConfig

        return TrainConfig
    return None


def option_names(name: str) -> list[str]:
    """Every option ``name`` takes, in the order of their declarations."""
    st = stage(name)
    names = [f.name for f in dataclasses.fields(st.options)]
    opened = open_config(st)
    if opened is not None:
        names += [f.name for f in dataclasses.fields(opened)]
    if st.open == "train":
        from .trainconfig import GPUS

        names.append(GPUS)
    return names


def check_keys(name: str, keys, where: str, prefix: str = "", extra=()) -> None:
    """Refuse keys that stage ``name`` does not take (``extra``: more valid keys, such as a
    job config's path keys), listing the valid ones."""
    config.check_keys(keys, [*option_names(name), *extra], where, stage(name).noun, prefix)


# ----------------------------------------------------------------------------- running


def prepare(name: str, options: Mapping | None = None, *, where: str = "command line",
            prefix: str = "", text: bool = True):
    """Check and type the options of stage ``name``; no work is done.

    Parameters
    ----------
    options : key -> value; text (``text=True``, a command line) or typed (a job config).
    where, prefix : for messages: where the options came from, and what stands before
        each key there (``--impute.``, ``impute.``); ``--`` means the stage's own command
        line, where options are named by their flags.

    Returns
    -------
    What the stage runs with: its options dataclass, a SimConfig, a :class:`TrainRequest`
    or a :class:`FinetuneRequest`.

    Raises
    ------
    InputError
        An unknown option (listing the valid ones) or a bad value, in one paragraph.
    """
    st = stage(name)
    options = dict(options or {})
    check_keys(name, options, where, prefix)
    if st.open == "simulate":
        return config.load(open_config(st), Source(options, where, text, prefix), noun=st.noun)
    fields = dataclasses.fields(st.options)
    own_names = {f.name for f in fields}
    own = {k: v for k, v in options.items() if str(k).replace("-", "_") in own_names}
    names = {f.name: flag(f) for f in fields} if prefix == "--" else {}
    opts = config.load(st.options, Source(own, where, text, prefix, names), noun=st.noun)
    if st.open != "train":
        return opts
    from .trainconfig import load_config, values

    rest = {k: v for k, v in options.items() if k not in own}
    if name == "finetune":  # the base model's config is read when the stage runs
        return FinetuneRequest(opts.config_file, values(Source(rest, where, text, prefix)),
                               opts.resume)
    cfg = load_config(opts.config_file, rest, where=where, text=text, prefix=prefix)
    if st.group == "personal":
        return PersonalRequest(opts, cfg)
    return TrainRequest(cfg, opts.resume)


def run_stage(name: str, paths: Mapping[str, str | None], options=None, *,
              where: str = "command line", prefix: str = "", text: bool = True):
    """Run stage ``name``: the one way every caller runs a stage.

    Parameters
    ----------
    paths : the stage's paths by name (see :data:`STAGES`); optional ones may be None.
    options : a mapping of options (prepared here, see :func:`prepare`), or what
        :func:`prepare` returned for this stage.

    Returns
    -------
    What the stage's function returns (a summary dict for most).

    Raises
    ------
    EdiceError
        For any failure: the stage's own errors as they are, every other error (an OS or
        object-store error, an error inside a Ray task or actor) as one paragraph
        (:func:`edice_dist.errors.explain`), chained to the original for the log file.
    """
    st = stage(name)
    missing = [p.flag for p in st.paths if p.required and not paths.get(p.name)]
    if missing:
        raise InputError(f"The {st.command} stage needs {', '.join(missing)}.")
    if options is None or isinstance(options, Mapping):
        options = prepare(name, options, where=where, prefix=prefix, text=text)
    try:
        return st.run(dict(paths), options)
    except EdiceError:
        raise
    except Exception as e:
        given = {p.flag: paths.get(p.name) for p in st.paths if paths.get(p.name)}
        urls = tuple(f"{v} ({k})" for k, v in given.items() if storage.is_url(v))
        shown = " ".join(f"{k} {v}" if k.startswith("--") else str(v) for k, v in given.items())
        raise explain(e, f"edice {st.command} {shown}", urls) from e
