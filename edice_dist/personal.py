"""``edice personal leave-one-out`` and ``edice personal leave-tissue-out``: personalised
imputation, the paper's second result (ENTEx: a few donors, many tissues each).

For every target donor (an ``individual`` of the store) some of its observed tracks are
hidden and imputed from everything else, with three kinds of model, and compared with the
AVG and TrackAVG baselines (:mod:`edice_dist.personunit` does one unit of this):

- ``others``: trained on the other donors' tracks only (the donor's cells are then new
  to it: their embedding rows start at the same tissue's rows of the other donors, and
  the individual bias it learnt from the other donors lets each read the donor's other
  tissues: :mod:`edice_dist.model`);
- ``finetuned``: ``others`` fine-tuned on the donor's remaining tracks (SPEC 2.7; the
  other donors' tracks are inputs, only the donor's are targets);
- ``alldonors``: trained from scratch on every track but the hidden ones.

Workflows: *leave-one-out* hides each observed track of a donor in turn (or, with
``folds=K``, the donor's tracks in K seeded folds); *leave-tissue-out* hides every track
of one tissue (cell type) of the donor at a time.

Units of work and their cost
----------------------------
One ``others`` model per donor, shared by every fold of that donor; per fold (a hidden
track, a fold of tracks or a tissue) one ``finetuned`` and one ``alldonors`` model, then an
``evaluate`` unit (predictions, baselines, metrics, plots). Leave-one-out of a donor with
T tracks trains 1 + 2T models (1 + 2K with folds); the plan is logged before any work.
Units run as Ray tasks, as many at once as Ray has CPUs for (or GPUs, for the model
units); one unit's training runs in its task's process (:func:`edice_dist.train.train`
with ``in_process``), so independent trainings run side by side.

Resume
------
``OUT/personal.json`` records the settings and the plan; a re-run with the same ones
skips every unit whose done marker (``OUT/_done/<unit>``, written after the unit's
result) exists, and a model unit cut short resumes from its model folder's checkpoints.
``--models`` may change between runs: adding one trains only it, and re-evaluates the
folds (an evaluate unit's marker names the models it scored).
The first failing unit stops the run (the others are cancelled) and is named.

Outputs in OUT: ``<donor>/others/`` (model), ``<donor>/<fold>/{finetuned,alldonors}/``
(models), ``<donor>/<fold>/evaluation/`` (``metrics.json``, ``record.json``, browser
PNGs), and over all units ``metrics.tsv``, ``summary.tsv``, ``metrics.json``, PNG plots
and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib

import numpy as np

from . import __version__, _faults, owned, storage
from .errors import EdiceError, InputError
from .personunit import KINDS, SUPPORT_SPLITS, Unit, marker
from .progress import Progress, log, stage
from .tracks import check_name

WORKFLOWS = ("leave-one-out", "leave-tissue-out")
FORMAT = "edice-personal"
RECORD = "personal.json"


def _pick(name: str, values: list[str] | None, have: list[str], what: str) -> list[str]:
    if not values:
        return have
    bad = [v for v in values if v not in have]
    if bad:
        raise InputError(f"--{name}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not "
                         f"{what} of the store (it has {', '.join(have) or 'none'}).")
    return [v for v in have if v in values]


def folds_of(st, workflow: str, donor: str, opts, seed: int = 0) -> list[tuple[str, list[int]]]:
    """The donor's folds: ``[(name, hidden store columns)]``, in a stable order.

    Leave-one-out: one fold per observed track (``<cell_type>-<assay>``), or ``folds``
    seeded folds (``fold-1`` ...); leave-tissue-out: one per cell type (``tissue-<name>``),
    hiding every observed track of it. ``cell_types`` (those the donor has) and ``assays``
    narrow the tracks hidden. Folds are dealt from a permutation seeded by ``seed`` and the donor's name.
    """
    cols = [i for i, t in enumerate(st.tracks)
            if t.individual == donor and t.split in SUPPORT_SPLITS]
    # A donor without one of the chosen cell types simply has no fold for it (donors
    # rarely share every tissue); plan_units refuses names that no donor has.
    cell_types = sorted({st.tracks[i].cell_type for i in cols
                         if not opts.cell_types or st.tracks[i].cell_type in opts.cell_types})
    cols = [i for i in cols if st.tracks[i].cell_type in cell_types]
    if workflow == "leave-tissue-out":
        return [(f"tissue-{ct}", [i for i in cols if st.tracks[i].cell_type == ct])
                for ct in cell_types]
    assays = _pick("assays", opts.assays, sorted({st.tracks[i].assay for i in cols}),
                   f"an assay of {donor}")
    cols = [i for i in cols if st.tracks[i].assay in assays]
    if not getattr(opts, "folds", None):
        return [(f"{st.tracks[i].cell_type}-{st.tracks[i].assay}", [i]) for i in cols]
    k = min(opts.folds, len(cols))
    order = np.random.default_rng([seed, zlib.crc32(donor.encode())]).permutation(cols)
    return [(f"fold-{j + 1}", sorted(int(c) for c in order[j::k])) for j in range(k)]


def plan_units(st, workflow: str, opts, seed: int = 0) -> tuple[list[Unit], list[str]]:
    """Every unit of the workflow, dependencies first; and notes on what cannot run.

    ``finetuned`` needs at least 2 of the donor's tracks left (one to fine-tune on, one to
    validate on); a fold that leaves fewer has no ``finetuned`` model (noted).
    """
    donors_all = sorted({t.individual for t in st.tracks if t.individual})
    if len(donors_all) < 2:
        raise InputError(f"Store {st.path} names {len(donors_all)} individual(s); personalised "
                         "imputation needs at least 2 (an `individual` column in the manifest).")
    donors = _pick("donors", opts.donors, donors_all, "an individual")
    _pick("cell-types", opts.cell_types, sorted({t.cell_type for t in st.tracks
                                                 if t.individual in donors}),
          "a cell type of the chosen donors")
    units: list[Unit] = []
    notes: list[str] = []
    ids = st.track_ids()
    for d in donors:
        own = [i for i, t in enumerate(st.tracks)
               if t.individual == d and t.split in SUPPORT_SPLITS]
        base = f"{d}/others"
        folds = folds_of(st, workflow, d, opts, seed)
        want_base = bool(folds) and ("others" in opts.models or "finetuned" in opts.models)
        if want_base:
            units.append(Unit(base, "others", d, "", ()))
        for name, hidden in folds:
            check_name(name, "fold name", f"donor {d}")
            hid = tuple(ids[i] for i in hidden)
            fold = f"{d}/{name}"
            needs = [base] if want_base else []
            if "alldonors" in opts.models:
                units.append(Unit(f"{fold}/alldonors", "alldonors", d, name, hid))
                needs.append(units[-1].id)
            if "finetuned" in opts.models:
                if len(own) - len(hidden) >= 2:
                    units.append(Unit(f"{fold}/finetuned", "finetuned", d, name, hid, (base,)))
                    needs.append(units[-1].id)
                else:
                    notes.append(f"{fold}: no finetuned model ({len(own) - len(hidden)} of "
                                 f"{d}'s tracks are left to fine-tune on; 2 are needed)")
            units.append(Unit(f"{fold}/evaluate", "evaluate", d, name, hid, tuple(needs)))
    if not any(u.kind == "evaluate" for u in units):
        raise InputError("Nothing to hide: no observed track of the chosen donors, cell types "
                         "and assays.")
    return units, notes


def cost_line(units: list[Unit]) -> str:
    n = {k: sum(u.kind == k for u in units) for k in ("others", "finetuned", "alldonors")}
    folds = sum(u.kind == "evaluate" for u in units)
    return (f"{sum(n.values())} models to train ({n['others']} others, {n['finetuned']} "
            f"finetuned, {n['alldonors']} alldonors) and {folds} folds to evaluate")


# ----------------------------------------------------------------------------- the folder


def _settings(st, workflow: str, opts, cfg, units: list[Unit], truth: str | None) -> dict:
    o = dataclasses.asdict(opts)
    for k in ("workers", "gpus", "plots", "force"):  # how to run, not what is computed
        o.pop(k, None)
    c = cfg.to_dict()
    for k in ("workers", "cpus_per_worker", "use_gpu", "max_failures"):
        c.pop(k, None)
    return {"format": FORMAT, "workflow": workflow, "store": st.identity(), "options": o,
            "train_config": c, "truth": truth, "units": [u.id for u in units]}


def _identity(settings: dict) -> dict:
    """What must match for a folder to be resumed: the settings less the store record
    (its tracks are compared), the plan and the models. A unit's result depends on its
    own id and these settings, not on which other models run beside it, so adding a model
    to a finished run trains only that model and re-evaluates the folds."""
    d = {k: v for k, v in settings.items() if k not in ("store", "units", "tool_version")}
    d["options"] = {k: v for k, v in d.get("options", {}).items() if k != "models"}
    return {**d, "tracks": settings.get("store", {}).get("tracks")}


def done_units(out: str, units: list[Unit]) -> set[str]:
    """Ids of the units whose done marker exists; an evaluate unit's only when it was done
    with the models the fold has now (its marker lists them)."""
    done = set()
    for u in units:
        path = marker(out, u)
        if not storage.exists(path):
            continue
        if u.kind == "evaluate" and \
                sorted(json.loads(storage.read_text(path)).get("needs", [])) != sorted(u.needs):
            continue
        done.add(u.id)
    return done


def _reconcile(out: str, settings: dict, force: bool) -> None:
    """Take ``out``; refuse a folder of other settings unless ``force``, which then drops
    what earlier runs computed there (only folders and files this workflow writes)."""
    owned.claim(out, "personal")
    path = storage.join(out, RECORD)
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        same = _identity(old) == _identity(settings)
        if not same and not force:
            raise InputError(
                f"{out} holds a {old.get('workflow')} run with other settings or data. Use a "
                "new --out folder, restore the settings to resume it, or pass --force to "
                "start it over.")
        if not same:
            log(f"personal: --force: starting {out} over")
            for name in storage.list_dir(out):
                if name != owned.MARKER:
                    storage.remove(storage.join(out, name))
    storage.write_text_atomic(path, json.dumps({**settings, "tool_version": __version__},
                                               indent=1) + "\n")


# ----------------------------------------------------------------------------- running


def _resources(opts, cfg) -> tuple[dict, dict, int]:
    """(Ray options of a model unit, of an evaluate unit, units at once)."""
    from . import raycluster

    raycluster.init()
    gpus = raycluster.gpu_count() if opts.gpus is None else min(opts.gpus, raycluster.gpu_count())
    if cfg.use_gpu and not gpus:
        raise InputError("use_gpu is true but Ray reports no GPU. Drop it to train on CPUs.")
    use_gpu = bool(gpus) if cfg.use_gpu is None else bool(cfg.use_gpu)
    threads = cfg.cpus_per_worker or 1
    if threads > raycluster.cpu_slots() and not os.environ.get("RAY_ADDRESS"):
        raise InputError(f"cpus_per_worker {threads} is more than the {raycluster.cpu_slots()} "
                         "CPUs Ray has: no unit could start. Lower it.")
    model = {"num_cpus": threads, "num_gpus": 1 if use_gpu else 0}
    slots = gpus if use_gpu else max(1, raycluster.cpu_slots() // threads)
    return model, {"num_cpus": 1, "num_gpus": 0}, opts.workers or max(slots, 1)


def _schedule(units: list[Unit], done: set[str], submit, workers: int) -> list[str]:
    """Run the units not in ``done`` as Ray tasks, each once its needs are done, at most
    ``workers`` at a time; ``submit(unit)`` returns the task's reference. The first failure
    cancels the running tasks and is raised.

    Returns
    -------
    Ids of the units run.
    """
    import ray

    todo = [u for u in units if u.id not in done]
    running: dict = {}
    ran = []
    prog = Progress(len(todo), "personal", unit="units")
    try:
        while todo or running:
            ready = [u for u in todo if all(n in done for n in u.needs)]
            for u in ready[:max(0, workers - len(running))]:
                running[submit(u)] = u
                todo.remove(u)
            if not running:
                raise EdiceError(f"Units {', '.join(u.id for u in todo[:4])} wait on units "
                                 "that are not planned; this is a bug.")
            finished, _ = ray.wait(list(running), num_returns=1)
            unit = running.pop(finished[0])
            status, value = ray.get(finished[0])
            if status == "input":
                raise InputError(f"Unit {unit.id}: {value}")
            if status != "ok":
                raise EdiceError(f"Unit {unit.id} failed: {value} The units done so far are "
                                 "kept; run the same command again to resume.")
            done.add(unit.id)
            ran.append(unit.id)
            prog.update()
    finally:
        for ref in running:  # a failure or Ctrl-C: stop the rest, their work resumes later
            ray.cancel(ref, force=True)
        if running:
            ray.wait(list(running), num_returns=len(running), timeout=30)
    return ran


def run_workflow(workflow: str, store: str, out: str, opts, cfg, truth: str | None = None) -> dict:
    """Run a personalised-imputation workflow (see the module docstring).

    Parameters
    ----------
    workflow : ``leave-one-out`` or ``leave-tissue-out``.
    store, out : the track store (with individuals) and the workflow's folder.
    opts : the stage's options (:class:`edice_dist.stages.LeaveOneOutOptions` or
        :class:`~edice_dist.stages.LeaveTissueOutOptions`).
    cfg : the training config of the ``others`` and ``alldonors`` models; fine-tuning takes
        its non-architecture keys too, with ``finetune_lr`` and ``finetune_epochs``.
    truth : optional table of peaks (``cell_type assay path [individual] peaks
        [person_peaks]``, e.g. a simulation's ``truth/observed.tsv``); without it, or for
        tracks it lacks, peaks are called from the store's values.

    Returns
    -------
    dict
        ``out``, ``units``, ``ran`` (unit ids computed now), ``rows``, ``summary``,
        ``files``.
    """
    from . import personreport, personunit
    from .store import open_store

    store, out, truth = map(storage.absolute, (store, out, truth))
    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown workflow {workflow!r}")
    opts = dataclasses.replace(opts, models=list(opts.models or KINDS))
    bad = [m for m in opts.models if m not in KINDS]
    if bad:
        raise InputError(f"--models: {', '.join(bad)} is not a model of this workflow; "
                         f"choose among {', '.join(KINDS)}.")
    owned.check(out, "personal")
    t0 = time.monotonic()
    cfg.validate()
    st = open_store(store)
    units, notes = plan_units(st, workflow, opts, cfg.seed)
    peaks = personunit.read_peak_table(truth, st) if truth else {}
    stage(1, 3, f"plan: {workflow} over {len({u.donor for u in units})} donor(s) of {store}: "
                f"{cost_line(units)}")
    for n in notes:
        log(f"note: {n}")
    _reconcile(out, _settings(st, workflow, opts, cfg, units, truth), opts.force)
    done = done_units(out, units)
    if done:
        log(f"personal: {len(done)} of {len(units)} units already done in {out}; skipping them")
    model_opts, eval_opts, workers = _resources(opts, cfg)
    spec = personunit.Spec(workflow=workflow, store=store, out=out, train=cfg.to_dict(),
                           finetune={"lr": opts.finetune_lr, "epochs": opts.finetune_epochs},
                           peaks=peaks, threads=model_opts["num_cpus"],
                           use_gpu=bool(model_opts["num_gpus"]), faults=_faults.active(),
                           plots=opts.plots)
    stage(2, 3, f"train and evaluate {len(units) - len(done)} unit(s), {workers} at a time")
    import ray

    # A unit's own errors come back as values; a worker that dies (killed for memory on a
    # loaded node) is retried once: a model unit resumes from its checkpoints.
    task = ray.remote(max_retries=1)(personunit.run_unit_safe)

    def submit(u: Unit):
        kw = eval_opts if u.kind == "evaluate" else model_opts
        return task.options(**kw).remote(spec, u)

    ran = _schedule(units, done, submit, workers) if len(done) < len(units) else []
    stage(3, 3, "tables, plots and report")
    res = personreport.collect(out, workflow, units, plots=opts.plots)
    log(f"personal: {workflow} done in {time.monotonic() - t0:.0f} s; {len(ran)} unit(s) "
        f"computed now; tables in {out}, report {res['files'].get('report.html')}")
    return {"out": out, "units": [u.id for u in units], "ran": ran, **res}
