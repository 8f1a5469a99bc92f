"""`edice evaluate`: imputed bigWigs against held-out truth, beside the AVG and TrackAVG
baselines, as tables, JSON and plots.

Inputs
------
- ``truth`` and ``imputed``: the truth manifest and the folder of imputed bigWigs (read
  by :mod:`edice_dist.truth`). Imputed bigWigs hold -log10 p unless the ``space`` column of
  their ``manifest.tsv``, or ``imputed_space``, says ``arcsinh``.
- ``store`` (optional): the track store. **AVG** of a truth track is, per bin, the mean of
  the store's observed tracks (split train or val, never test) of the same assay in the
  other cell keys; **TrackAVG** the mean of the same cell type and assay over the other
  individuals (only when the truth names individuals). Means are taken in the
  evaluation space (store values are arcsinh; ``sinh`` gives -log10 p).

Genome: the store's chromosomes when a store is given; else ``chrom_sizes``, else a
``chrom.sizes`` beside the truth folder (``OUT/chrom.sizes`` of a simulation), else the
first truth bigWig's header. Every truth and imputed bigWig must hold every chromosome with
the same size. Top sets break ties in this genome order.

Peaks: the track's BED when the ``peaks`` column names one (a bin is a peak bin when it
overlaps a peak by >= 1 bp); otherwise bins whose truth -log10 p is >= 2
(:data:`edice_dist.metrics.PEAK_PVAL`). A ``person_peaks`` BED (a simulation with
individuals writes one per held-out track) adds ``auprc_person`` and its chance level
``person_frac``. Annotation: ``promoters.bed``, ``gene_bodies.bed``
and ``enhancers.bed`` of ``annotation`` (default: ``annotation/`` beside the truth folder)
add ``mse_promoter``, ``mse_genebody`` and ``mse_enhancer``.

Outputs in ``out`` (default ``<imputed>/../evaluation``, i.e. ``RUN_DIR/evaluation``):
``metrics.tsv`` (one row per track and method), ``summary.tsv`` (per assay and overall),
``metrics.json`` (both, with counts and settings), PNG plots, ``report.html`` (all of them on
one self-contained page, with the provenance: :mod:`edice_dist.report`) and ``_cache/``
(one JSON per track and method, reused by a re-run whose inputs have not changed).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import operator
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import __version__, baselines, owned, spaces, storage
from .errors import EdiceError, InputError
from .genome import Genome, bed_bin_mask, read_bed
from .metrics import PEAK_PVAL, call_peaks, track_metrics
from .progress import Progress, log
from .tables import METHODS, format_table, json_number, metric_columns, summarise, write_tables
from .truth import TruthTrack, check_header, imputed_paths, read_truth, resolve_genome

ANNOTATION_FILES = {"promoter": "promoters.bed", "genebody": "gene_bodies.bed",
                    "enhancer": "enhancers.bed"}
READ_BINS = 1 << 17
"""Bins read per chunk (a 3.3 Mbp window: pyBigWig's per-base buffer is ~26 MB)."""
_CACHE_VERSION = 1
PARALLEL_MIN_TRACKS = 16
"""``edice evaluate`` starts a local Ray for its tasks from this many truth tracks."""


# ---------------------------------------------------------------- one track, one method


@dataclass(frozen=True)
class Job:
    """Everything one (truth track, method) evaluation needs; picklable for Ray."""

    track: TruthTrack
    method: str
    genome: Genome
    space: str
    pred_path: str = ""
    pred_space: str = "pval"
    store: str = ""
    columns: tuple[int, ...] = ()
    annotation: tuple[tuple[str, str], ...] = ()
    read_bins: int = READ_BINS
    tmpdir: str | None = None
    baselines: str = ""  # the baselines averaged beforehand (:mod:`edice_dist.baselines`) ...
    baseline_column: int = -1  # ... and this job's column there; else the store is read
    fingerprint: dict = field(default_factory=dict, compare=False)


def baseline_window(store, chrom: str, start: int, stop: int, columns, space: str) -> np.ndarray:
    """The per-bin mean of store ``columns`` over bins ``[start, stop)`` in ``space``.

    Returns
    -------
    np.ndarray, shape (stop - start,), float32
    """
    data = spaces.to_space(store.read(chrom, start, stop, columns), space)
    return data.mean(axis=1).astype(np.float32)


def _bed(path: str, genome: Genome, what: str) -> dict[str, np.ndarray]:
    if not storage.exists(path):
        raise InputError(f"The {what} BED {path} does not exist. Fix the path or remove it.")
    return read_bed(path, genome)


def job_chunks(job: Job, local: dict[str, str] | None = None):
    """Yield ``(truth, prediction, peaks, regions, person-specific peaks)`` chunk by chunk
    in genome order (regions and person-specific peaks None when the job has none).

    ``local`` maps bigWig paths (URLs) to local copies already fetched
    (:func:`_local_copies`); messages still name the paths of the job."""
    from .sources import open_source
    from .store import open_store

    label = job.track.track_id
    peaks = _bed(job.track.peaks, job.genome, f"peak ({label})") if job.track.peaks else None
    person = (_bed(job.track.person_peaks, job.genome, f"person-specific peak ({label})")
              if job.track.person_peaks else None)
    regions = {name: _bed(p, job.genome, "annotation") for name, p in job.annotation}
    store = open_store(job.store) if job.method != "model" else None
    averaged = baselines.open_group(job.baselines) if job.baselines else None
    read_bins = job.read_bins
    if store is not None:  # whole store chunks per read
        read_bins = max(1, round(read_bins / store.chunk_bins)) * store.chunk_bins
    local = local or {}
    with open_source(local.get(job.track.path, job.track.path), job.genome, label=label,
                     shown=job.track.path) as truth_src:
        pred_src = (open_source(local.get(job.pred_path, job.pred_path), job.genome,
                                label=f"imputed {label}", shown=job.pred_path)
                    if job.method == "model" else None)
        try:
            for ch in job.genome.chunks(read_bins):
                pval = truth_src.binned(ch.chrom, ch.start, ch.stop)
                t = spaces.to_space(pval, job.space, "pval", np.float32)
                if pred_src is not None:
                    y = spaces.to_space(pred_src.binned(ch.chrom, ch.start, ch.stop),
                                        job.space, job.pred_space, np.float32)
                elif averaged is not None:
                    y = baselines.read(averaged, store.array_key(ch.chrom), job.baseline_column,
                                       ch.start, ch.stop)
                else:
                    y = baseline_window(store, ch.chrom, ch.start, ch.stop, job.columns, job.space)
                if peaks is not None:
                    p = bed_bin_mask(peaks.get(ch.chrom), ch.start, ch.stop, job.genome.bin_size)
                else:
                    p = call_peaks(pval)
                r = {name: bed_bin_mask(iv.get(ch.chrom), ch.start, ch.stop, job.genome.bin_size)
                     for name, iv in regions.items()}
                q = (None if person is None else
                     bed_bin_mask(person.get(ch.chrom), ch.start, ch.stop, job.genome.bin_size))
                yield t, y, p, (r or None), q
        finally:
            if pred_src is not None:
                pred_src.close()


def run_job(job: Job, local: dict[str, str] | None = None) -> dict:
    """The metrics of one job (see :func:`edice_dist.metrics.track_metrics`)."""
    # Every tee copy must be consumed, in lockstep, or tee would keep the whole genome.
    used = [0, 1, 2] + [i for i, on in ((3, job.annotation), (4, job.track.person_peaks)) if on]
    tees = itertools.tee(job_chunks(job, local), len(used))
    its = {i: map(operator.itemgetter(i), it) for i, it in zip(used, tees, strict=True)}
    try:
        return track_metrics(its[0], its[1], its[2], its.get(3), its.get(4), tmpdir=job.tmpdir)
    except ValueError as e:
        raise InputError(f"Evaluating {job.method} for {job.track.track_id}: {e}.") from None


def _safe(fn, *args) -> tuple[str, object]:
    """For Ray tasks: return errors as values so the driver re-raises them cleanly."""
    try:
        return "ok", fn(*args)
    except EdiceError as e:
        return "input", str(e)
    except Exception as e:  # unexpected: keep the type in the message
        return "error", f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def _local_copies(paths):
    """{path: local file} with every URL among ``paths`` downloaded once (local paths map
    to themselves); the copies are removed on exit."""
    with contextlib.ExitStack() as stack:
        yield {p: stack.enter_context(storage.local_copy(p, ".gz" if p.endswith(".gz") else ""))
               for p in dict.fromkeys(paths) if p and storage.is_url(p)}


def track_task(jobs: list[Job], todo: list[int], width: int | None) -> tuple[list, object]:
    """Every evaluation ``jobs[i]`` (``i`` in ``todo``) of one truth track and, with a
    ``width``, its browser panel: the work of one Ray task, which fetches the track's
    truth and imputed bigWigs once for all of them.

    Returns
    -------
    (list of (status, metrics or message) per ``todo``, (status, panel or message) or None)
    """
    paths = [jobs[0].track.path] + [j.pred_path for j in jobs]
    with _local_copies(paths) as local:
        results = [_safe(run_job, jobs[i], local) for i in todo]
        panel = _safe(_panel, jobs, width, local) if width else None
    return results, panel


# ---------------------------------------------------------------- caching


def _stat(path: str) -> list:
    fs, p = storage.filesystem(path)
    info = fs.info(p)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
    return [path, int(info.get("size") or 0), str(stamp)]


def _fingerprint(job: Job, store_id: str) -> dict:
    files = [_stat(job.track.path)]
    if job.track.peaks:
        files.append(_stat(job.track.peaks))
    if job.track.person_peaks:
        files.append(_stat(job.track.person_peaks))
    if job.pred_path:
        files.append(_stat(job.pred_path))
    files += [_stat(p) for _, p in job.annotation]
    return {"cache_version": _CACHE_VERSION, "tool_version": __version__, "method": job.method,
            "space": job.space, "pred_space": job.pred_space, "files": files,
            "store": store_id if job.store else "", "columns": list(job.columns),
            "chroms": job.genome.to_json(), "peak_rule": None if job.track.peaks else PEAK_PVAL}


def _cache_path(out: str, job: Job) -> str:
    return storage.child(out, "_cache", f"{job.track.track_id}.{job.method}.json",
                         what=f"the track id of truth track {job.track.track_id}")


def _cached(out: str, job: Job) -> dict | None:
    path = _cache_path(out, job)
    if not storage.exists(path):
        return None
    try:
        d = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None
    if d.get("fingerprint") != json.loads(json.dumps(job.fingerprint)):
        return None
    return {k: (float("nan") if v is None else v) for k, v in d["metrics"].items()}


def _save_cache(out: str, job: Job, metrics: dict) -> None:
    d = {"fingerprint": job.fingerprint, "metrics": {k: json_number(v) for k, v in metrics.items()}}
    storage.write_text_atomic(_cache_path(out, job), json.dumps(d, indent=1) + "\n")


# ---------------------------------------------------------------- planning and running


def plan_jobs(truth: list[TruthTrack], preds: dict[str, tuple[str, str]], genome: Genome,
              space: str, store=None, annotation: dict[str, str] | None = None,
              tmpdir: str | None = None, read_bins: int = READ_BINS) -> list[Job]:
    """One model job per truth track, plus AVG / TrackAVG jobs where the store has the
    tracks to average."""
    ann = tuple(sorted((annotation or {}).items()))
    jobs = []
    individuals = any(t.individual for t in truth)
    for t in truth:
        path, pspace = preds[t.track_id]
        jobs.append(Job(t, "model", genome, space, pred_path=path, pred_space=pspace,
                        annotation=ann, read_bins=read_bins, tmpdir=tmpdir))
        if store is None:
            continue
        usable = [(i, s) for i, s in enumerate(store.tracks)
                  if s.assay == t.assay and s.split in ("train", "val")]
        avg = tuple(i for i, s in usable if s.cell_key != t.cell_key)
        groups = {"AVG": avg}
        if individuals and t.individual:
            groups["TrackAVG"] = tuple(i for i, s in usable if s.cell_type == t.cell_type
                                       and s.individual and s.individual != t.individual)
        for method, cols in groups.items():
            if not cols:
                log(f"evaluate: no {method} baseline for {t.track_id}: the store has no "
                    f"train/val {t.assay} track to average for it.")
                continue
            jobs.append(Job(t, method, genome, space, store=store.path, columns=cols,
                            annotation=ann, read_bins=read_bins, tmpdir=tmpdir))
    return jobs


def run_jobs(jobs: list[Job], out: str, parallel: bool | None = None, panels: int = 0,
             width: int = 0) -> tuple[list[dict], list[dict]]:
    """Metrics of every job, from the cache where its inputs are unchanged, and the
    browser panels of the first ``panels`` truth tracks (:func:`_panel`).

    The evaluations of one truth track run together (:func:`track_task`), so that its
    bigWigs are fetched once; with Ray tasks when Ray is initialised (``parallel=None``)
    or ``parallel`` is true.

    Returns
    -------
    (metrics per job, panels in truth order)
    """
    results: list[dict | None] = [_cached(out, j) for j in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    if len(todo) < len(jobs):
        log(f"evaluate: {len(jobs) - len(todo)} of {len(jobs)} track evaluations reused from "
            f"{storage.join(out, '_cache')}.")
    groups: dict[str, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.track.track_id, []).append(i)
    order = list(groups)
    calls = []  # (track, job indices, indices into them to compute, panel width)
    for n, tid in enumerate(order):
        idx = groups[tid]
        want = [k for k, i in enumerate(idx) if results[i] is None]
        w = width if n < panels else None
        if want or w:
            calls.append((tid, idx, want, w))
    found: dict[str, dict] = {}
    if not calls:
        return results, []
    prog = Progress(len(todo), "evaluate", unit="track evaluations") if todo else None
    if parallel is None:
        try:
            import ray

            parallel = ray.is_initialized() and len(calls) > 1
        except ImportError:
            parallel = False

    def finish(call, answer):
        tid, idx, want, _ = call
        metrics, panel = answer
        for k, (status, value) in zip(want, metrics, strict=True):
            job = jobs[idx[k]]
            if status == "input":
                raise InputError(value)
            if status != "ok":
                raise EdiceError(f"Evaluating {job.method} for {job.track.track_id} "
                                 f"failed: {value}")
            results[idx[k]] = value
            _save_cache(out, job, value)
            prog.update()
        if panel is not None:
            status, value = panel
            if status == "input":
                raise InputError(value)
            if status != "ok":
                raise EdiceError(f"Drawing the browser panel of {tid} failed: {value}")
            found[tid] = value

    if parallel:
        import ray

        task = ray.remote(num_cpus=1, max_retries=1)(track_task)
        refs = {task.remote([jobs[i] for i in c[1]], c[2], c[3]): c for c in calls}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            finish(refs[done[0]], ray.get(done[0]))
    else:
        for c in calls:
            finish(c, track_task([jobs[i] for i in c[1]], c[2], c[3]))
    return results, [found[t] for t in order if t in found]


def _average_baselines(jobs: list[Job], out: str, store, space: str,
                       parallel: bool | None) -> tuple[list[Job], str]:
    """The baseline jobs still to compute, pointed at their column of the baselines
    averaged in one pass over the store (:mod:`edice_dist.baselines`: read per job, the
    store would be read once per truth track). Returns (jobs, the baselines' path or "")."""
    need = [i for i, j in enumerate(jobs) if j.store and _cached(out, j) is None]
    if not need:
        return jobs, ""
    groups = list(dict.fromkeys(jobs[i].columns for i in need))
    if parallel is None:
        try:
            import ray

            parallel = ray.is_initialized()
        except ImportError:
            parallel = False
    log(f"evaluate: averaging {len(groups)} baseline(s) of {len(need)} evaluations in one "
        f"pass over the store.")
    path = baselines.compute(store, groups, out, space, parallel)
    column = {g: k for k, g in enumerate(groups)}
    jobs = list(jobs)
    for i in need:
        jobs[i] = replace(jobs[i], baselines=path, baseline_column=column[jobs[i].columns])
    return jobs, path


def _panel(track_jobs: list[Job], width: int, local: dict[str, str]) -> dict:
    """The data of the genome-browser plot of one truth track: a window of ``width`` bins
    around the truth's highest bin on the first chromosome.

    Returns
    -------
    dict
        ``track_id``, ``panel`` (label -> values, shape (w,): truth, model, baselines),
        ``chrom``, ``start_bin``, ``bin_size``, ``peaks`` (shape (w,), bool), ``title`` and
        ``ylabel`` (the value space), as :func:`edice_dist.plots.browser` takes them.
    """
    from .sources import open_source
    from .store import open_store

    job = next(j for j in track_jobs if j.method == "model")
    g, t = job.genome, job.track
    chrom = g.chroms[0]
    nb = g.n_bins(chrom)
    with open_source(local.get(t.path, t.path), g, label=t.track_id, shown=t.path) as src:
        best, best_at = -np.inf, 0
        for s in range(0, nb, job.read_bins):
            v = src.binned(chrom, s, min(s + job.read_bins, nb))
            if len(v) and v.max() > best:
                best, best_at = float(v.max()), s + int(np.argmax(v))
        a = max(0, min(best_at - width // 2, nb - width))
        b = min(nb, a + width)
        pval = src.binned(chrom, a, b)
    panel = {"truth": spaces.to_space(pval, job.space, "pval", np.float32)}
    for j in track_jobs:
        if j.method == "model":
            with open_source(local.get(j.pred_path, j.pred_path), g,
                             label=f"imputed {t.track_id}", shown=j.pred_path) as src:
                panel["model"] = spaces.to_space(src.binned(chrom, a, b), j.space,
                                                 j.pred_space, np.float32)
        else:
            panel[j.method] = baseline_window(open_store(j.store), chrom, a, b, j.columns,
                                              j.space)
    if t.peaks:
        peaks = bed_bin_mask(read_bed(t.peaks, g).get(chrom), a, b, g.bin_size)
    else:
        peaks = call_peaks(pval)
    return {"track_id": t.track_id, "panel": panel, "chrom": chrom, "start_bin": a,
            "bin_size": g.bin_size, "peaks": peaks,
            "title": f"{t.track_id} ({t.cell_type} {t.assay})", "ylabel": job.space}


# ---------------------------------------------------------------- the command


def _annotation(annotation: str | None, truth_path: str) -> dict[str, str]:
    folder = annotation
    if folder is None:
        folder = storage.join(storage.parent(storage.parent(truth_path)), "annotation")
        if not storage.exists(folder):
            return {}
    elif not folder:
        return {}
    elif not storage.exists(folder):
        raise InputError(f"Annotation folder {folder} does not exist.")
    found = {name: storage.join(folder, f) for name, f in ANNOTATION_FILES.items()
             if storage.exists(storage.join(folder, f))}
    if annotation and not found:
        raise InputError(f"Annotation folder {folder} has none of "
                         f"{', '.join(ANNOTATION_FILES.values())}.")
    return found


def evaluate(
    truth: str,
    imputed: str,
    store: str | None = None,
    out: str | None = None,
    space: str = "arcsinh",
    plots: bool = True,
    annotation: str | None = None,
    chrom_sizes: str | None = None,
    imputed_space: str = "pval",
    parallel: bool | None = None,
    tmpdir: str | None = None,
    read_bins: int = READ_BINS,
    quiet: bool = False,
    start_ray_from: int | None = None,
) -> dict:
    """Evaluate imputed tracks against the truth, with baselines (see the module docstring).

    Parameters
    ----------
    truth : str
        Truth manifest (``truth/targets.tsv``).
    imputed : str
        Folder of imputed bigWigs.
    store : str, optional
        Track store for the AVG / TrackAVG baselines.
    out : str, optional
        Output folder (default ``<imputed>/../evaluation``).
    space : {"arcsinh", "pval"}
        Space of the metrics: arcsinh(-log10 p) (the paper's) or -log10 p.
    plots : bool
        Write the PNG plots.
    annotation : str, optional
        Folder with promoters.bed, gene_bodies.bed, enhancers.bed; None looks beside the
        truth folder, "" disables.
    chrom_sizes : str, optional
        Genome when no store is given.
    imputed_space : {"pval", "arcsinh"}
        Values of the imputed bigWigs unless their manifest says otherwise.
    parallel : bool, optional
        Ray tasks per track and method (default: when Ray is initialised).
    tmpdir : str, optional
        Folder for the external sorts (about 34 bytes per bin per running evaluation).
    start_ray_from : int, optional
        With ``parallel`` None and Ray not running, start a local Ray
        (:func:`edice_dist.raycluster.init`) when there are at least this many truth
        tracks and more than one CPU (``edice evaluate``: :data:`PARALLEL_MIN_TRACKS`).

    Returns
    -------
    dict
        ``rows`` (per track and method), ``summary``, ``out`` and the written ``files``.
    """
    truth, imputed, store, out = map(storage.absolute, (truth, imputed, store, out))
    t0 = time.monotonic()
    spaces.check(space)
    spaces.check(imputed_space, "imputed_space")
    truth_tracks = read_truth(truth)
    if (parallel is None and start_ray_from is not None
            and len(truth_tracks) >= start_ray_from and (os.cpu_count() or 1) > 1):
        # A consortium's evaluation is thousands of independent track passes: Ray tasks on
        # every CPU (a few tracks are quicker here than Ray's start).
        from .raycluster import init

        init()
    preds = imputed_paths(imputed, truth_tracks, imputed_space)
    st = None
    if store:
        from .store import open_store

        st = open_store(store)
    genome = resolve_genome(truth, truth_tracks, st.genome if st else None, chrom_sizes)
    for t in truth_tracks:
        if t.peaks and not storage.exists(t.peaks):
            raise InputError(f"The peak BED {t.peaks} of truth track {t.track_id} does not "
                             "exist. Fix the peaks column of the truth manifest, or empty it "
                             f"to call peaks from the truth (-log10 p >= {PEAK_PVAL}).")
        check_header(t.path, t.track_id, genome)
        check_header(preds[t.track_id][0], f"imputed {t.track_id}", genome)
    ann = _annotation(annotation, truth)
    out = out or storage.join(storage.parent(imputed.rstrip("/")), "evaluation")
    owned.claim(out, "evaluation")
    jobs = plan_jobs(truth_tracks, preds, genome, space, st, ann, tmpdir, read_bins)
    store_id = json.dumps(_stat(storage.join(store, "zarr.json"))) if store else ""
    jobs = [replace(j, fingerprint=_fingerprint(j, store_id)) for j in jobs]
    log(f"evaluate: {len(truth_tracks)} truth tracks, {len(jobs)} evaluations "
        f"({', '.join(f'{m} {sum(j.method == m for j in jobs)}' for m in METHODS)}) over "
        f"{genome.total_bins:,} bins in {space} space.")
    jobs, averaged = _average_baselines(jobs, out, st, space, parallel)
    n_panels, width = 0, 0
    if plots:  # matplotlib is imported only when plots are drawn
        from . import plots as _plots

        n_panels, width = _plots.MAX_BROWSERS, _plots.BROWSER_BINS
    results, browsers = run_jobs(jobs, out, parallel, n_panels, width)
    if averaged:
        storage.remove(averaged)  # every job that needed it has its metrics cached now

    rows = []
    for j, res in zip(jobs, results, strict=True):
        t = j.track
        rows.append({"cell_type": t.cell_type, "assay": t.assay, "method": j.method,
                     "individual": t.individual, "cell_key": t.cell_key,
                     "track_id": t.track_id, **res})
    metrics = metric_columns(rows)
    summary = summarise(rows, metrics)
    has_ind = any(t.individual for t in truth_tracks)
    cols = ["cell_type", "assay", "method"] + metrics + (["individual"] if has_ind else [])
    doc = {
        "tool": "edice-dist", "tool_version": __version__, "space": space,
        "truth": truth, "imputed": imputed, "store": store or None,
        "genome": genome.to_json(), "metrics": metrics,
        "peaks": f"truth BED when given, else bins with -log10 p >= {PEAK_PVAL}",
        "annotation": ann,
    }
    files = write_tables(out, cols, rows, summary, doc)
    if plots:
        files.update(_plots.write_all(out, rows, summary, metrics, browsers))
    from .report import write_report

    files["report.html"] = write_report(
        out, rows, summary, metrics, {n: p for n, p in files.items() if n.endswith(".png")},
        doc, imputed)
    table = format_table(summary, metrics)
    if not quiet:
        print(table, flush=True)
    log(f"evaluate: done in {time.monotonic() - t0:.0f} s; tables and plots in {out}; "
        f"report {files['report.html']}.")
    return {"rows": rows, "summary": summary, "out": out, "files": files, "table": table}


