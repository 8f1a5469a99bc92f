"""``edice impute``: the plan of a genome-wide imputation and its run folder.

The driver resolves the targets (every missing pair of the model's vocabulary by
default) and the supports, plans one work unit per store chunk over the chosen
chromosomes, records the run in its folder (:mod:`edice_dist.runfolder`), hands the
chunks still to do to the actor pool (:mod:`edice_dist.imputepool`), finalises the output
store and exports the bigWigs (:mod:`edice_dist.export`). Each chunk's done marker is
written after its data, so a re-run skips finished chunks; a run with other settings in
the same folder is refused unless ``force`` is set.
"""

from __future__ import annotations

import difflib
import os
import time

import numpy as np

from . import _faults, owned, runfolder, spaces, storage
from ._partial import check_complete, done_set, partial_path
from .errors import InputError
from .hub import DEFAULT_EMAIL, check_genome
from .progress import Progress, log, stage
from .tracks import parse_targets

SUPPORT_SPLITS = ("train", "val")  # test tracks are never supports (ARCHITECTURE.md)


# -- inputs: targets, supports ------------------------------------------------------------


def _near(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def resolve_targets(spec, store, meta: dict) -> list[tuple[str, str]]:
    """The run's targets as (cell_key, assay) pairs, in a stable order.

    Parameters
    ----------
    spec : None, str or list of (cell_key, assay)
        None: every pair of the model's vocabulary with no support track in the store
        (test-split tracks count as unobserved, so they are imputed for evaluation).
        A str is a targets TSV or ``cell:assay,cell:assay`` (:func:`tracks.parse_targets`).
        Observed pairs may be listed (quality control: they are predicted from all
        supports, themselves included).

    Raises
    ------
    InputError
        A target's cell or assay is not in the model's vocabulary (the message lists the
        valid names and the nearest ones), or no target is left.
    """
    cells, assays = list(meta["cell_keys"]), list(meta["assays"])
    if spec is None:
        observed = {(t.cell_key, t.assay) for t in store.tracks if t.split in SUPPORT_SPLITS}
        pairs = [(c, a) for c in cells for a in assays if (c, a) not in observed]
        pairs, untrained = _trained_only(pairs, meta)
        if untrained:
            log(f"warning: not imputing {len(untrained)} pair(s) whose cell type or assay had "
                f"no training track when the model was trained ({_untrained_text(untrained, meta)})"
                ": their embeddings are untrained, so their predictions would be noise. Train "
                "or fine-tune the model on a store where they have train-split tracks.")
        if not pairs:
            raise InputError(
                f"Store {store.path} observes every (cell type, assay) pair of the model's "
                "vocabulary that the model was trained for, so there is nothing to impute. "
                "Name targets with --targets (observed pairs are allowed, for quality control)."
            )
        return pairs
    pairs = parse_targets(spec) if isinstance(spec, str) else [tuple(p) for p in spec]
    bad = []
    for c, a in pairs:
        if c not in cells:
            bad.append(f"cell type {c!r} (target {c}:{a}{_near(c, cells)})")
        if a not in assays:
            bad.append(f"assay {a!r} (target {c}:{a}{_near(a, assays)})")
    if bad:
        raise InputError(
            f"{len(bad)} target name(s) are not in the model's vocabulary: {'; '.join(bad[:6])}"
            f"{'; ...' if len(bad) > 6 else ''}. The model knows the cell types "
            f"{', '.join(cells[:20])}{', ...' if len(cells) > 20 else ''} and the assays "
            f"{', '.join(assays)}. A model can only impute pairs of its vocabulary."
        )
    _, untrained = _trained_only(pairs, meta)
    if untrained:
        raise InputError(
            f"{len(untrained)} target(s) have a cell type or assay that had no training track "
            f"when the model was trained: {_untrained_text(untrained, meta)}. Their embeddings "
            "were never trained, so their predictions would be noise. Drop those targets, or "
            "train (or fine-tune) the model on a store where they have train-split tracks."
        )
    seen, out = set(), []
    for p in pairs:  # duplicates would give two writers the same bigWig
        if p not in seen:
            seen.add(p)
            out.append(p)
    if not out:
        raise InputError("The target list is empty.")
    return out


def _trained_only(pairs: list[tuple[str, str]], meta: dict) -> tuple[list, list]:
    """(pairs whose cell and assay had training tracks, the others). A model that does not
    record what it was trained on (one not made by `edice train`) is trusted, with a note."""
    cells, assays = meta.get("trained_cell_keys"), meta.get("trained_assays")
    if cells is None or assays is None:
        log("note: the model does not record which cell types and assays had training "
            "tracks, so targets cannot be checked for untrained embeddings")
        return list(pairs), []
    cells, assays = set(cells), set(assays)
    good = [(c, a) for c, a in pairs if c in cells and a in assays]
    return good, [(c, a) for c, a in pairs if c not in cells or a not in assays]


def _untrained_text(pairs: list[tuple[str, str]], meta: dict) -> str:
    cells = sorted({c for c, _ in pairs} - set(meta["trained_cell_keys"]))
    assays = sorted({a for _, a in pairs} - set(meta["trained_assays"]))
    parts = ([f"cell type(s) {', '.join(cells[:8])}{', ...' if len(cells) > 8 else ''}"]
             if cells else []) + ([f"assay(s) {', '.join(assays[:8])}"
                                   f"{', ...' if len(assays) > 8 else ''}"] if assays else [])
    shown = ", ".join(f"{c}:{a}" for c, a in pairs[:6]) + (", ..." if len(pairs) > 6 else "")
    return f"{' and '.join(parts)} never trained; target(s) {shown}"


def select_supports(store, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store columns used as supports and their vocabulary indices.

    Returns
    -------
    cols : (S,) int64, store columns of train/val tracks whose cell and assay the model knows.
    cells, assays : (S,) int64, their indices in the model's vocabulary.

    Raises
    ------
    InputError
        The store's value transform is not the model's, or no store track maps into the
        model's vocabulary.
    """
    if store.transform != meta.get("transform"):
        raise InputError(
            f"Store {store.path} holds values transformed by {store.transform!r} but the model "
            f"was trained on {meta.get('transform')!r} values. Re-ingest the tracks the way "
            "the model's training store was built, or use a model trained on this store."
        )
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    cols = [i for i, t in enumerate(store.tracks)
            if t.split in SUPPORT_SPLITS and t.cell_key in ci and t.assay in ai]
    if not cols:
        raise InputError(
            f"No train/val track of store {store.path} has a cell type and an assay of the "
            f"model's vocabulary (store: {', '.join(store.cell_keys[:8])} x "
            f"{', '.join(store.assays[:8])}; model: {', '.join(meta['cell_keys'][:8])} x "
            f"{', '.join(meta['assays'][:8])}), so there is nothing to impute from. Use a "
            "model trained on a consortium that shares cell types and assays with this store."
        )
    cols = np.array(cols, dtype=np.int64)
    cells = np.array([ci[store.tracks[i].cell_key] for i in cols], dtype=np.int64)
    assays = np.array([ai[store.tracks[i].assay] for i in cols], dtype=np.int64)
    return cols, cells, assays


def requested_dtype(dtype: str | None) -> str | None:
    """The compute dtype the run asks of every actor: ``dtype``, else
    ``EDICE_PREDICT_DTYPE`` (read here, on the driver, and passed on: actors on other nodes
    do not see the driver's environment), else None, which lets each actor choose from
    its own device (:func:`edice_dist.predict.resolve_dtype`: bf16 on GPUs and on CPUs
    with native bf16, float32 elsewhere).

    Raises
    ------
    InputError
        Not a dtype name that predict knows.
    """
    import torch

    from .predict import resolve_dtype

    dtype = dtype or os.environ.get("EDICE_PREDICT_DTYPE") or None
    if dtype is None:
        return None
    try:
        return str(resolve_dtype(torch.device("cpu"), dtype)).replace("torch.", "")
    except ValueError as e:
        raise InputError(f"--dtype: {e}.") from None


def output_dtype(requested: str | None) -> str:
    """The output store's dtype, fixed before any actor starts: float32 when float32 is
    asked for (exact results), else float16, which holds bf16 results with room to spare
    and float32 ones to 2^-11 (BENCHMARKS.md, "Imputation")."""
    return "float32" if requested == "float32" else "float16"


def _actors_line(actors: list[dict]) -> str:
    """What the actors chose, e.g. ``2 x cpu bfloat16 1 thread``."""
    kinds: dict[str, int] = {}
    for a in actors:
        k = f"{a['device']} {a['dtype']} {a['threads']} thread(s)"
        kinds[k] = kinds.get(k, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in kinds.items())


def impute(store: str, model: str, out: str, targets=None, chroms: list[str] | None = None,
           force: bool = False, workers: int | None = None, gpus: int | None = None,
           space: str = "pval", export: bool = True, batch_bins: int | None = None,
           dtype: str | None = None, hub: bool = True, genome: str | None = None,
           hub_observed: str = "none", hub_email: str = DEFAULT_EMAIL,
           uncertainty: int = 0) -> dict:
    """``edice impute``: predict every target over the genome, then export bigWigs.

    Parameters
    ----------
    store, model, out : the track store, the model folder and the run folder (paths or URLs).
    targets : None (every unobserved pair of the model's vocabulary), a targets TSV, a list
        ``cell:assay,...`` or a list of (cell_key, assay) pairs.
    chroms : chromosomes to impute (default: all of the store's, in its order).
    force : start the run over when ``out`` holds a run with other settings.
    workers, gpus : actor pool size (see :func:`edice_dist.imputepool.pool_shape`).
    space : bigWig values, ``pval`` (-log10 p) or ``arcsinh``.
    export : write the bigWigs at the end.
    batch_bins : bins per forward batch (default: sized from the number of targets).
    dtype : decoder compute dtype, ``float32`` or ``bfloat16`` (default: each actor's
        choice for its own device, see :func:`requested_dtype`); float32 also makes the
        output store float32 (else float16, :func:`output_dtype`).
    hub, genome, hub_observed, hub_email : the track hub of the export (see
        :func:`edice_dist.export.export`).
    uncertainty : Monte Carlo dropout samples per bin (0: none, else at least 2): the
        output store then holds each target's spread too, and the export writes it as
        ``<track_id>.spread.bigWig`` (see :func:`edice_dist.predict.predict_chunk`).

    Returns
    -------
    dict
        Summary: ``tracks``, ``bins``, ``target_bins``, ``chunks_total``, ``chunks_computed``,
        ``chunks_skipped``, ``seconds``, ``target_bins_per_s``, ``actor_failures``,
        ``peak_actor_rss_mib``, ``actors`` (each actor's statistics: device, dtype and
        threads it chose, node, ...), ``export`` (the export summary, when run).
    """
    from .checkpoint import load_meta, model_sha256
    from .store import open_store

    spaces.check(space)
    check_genome(genome)
    # Settings first: nothing is read or written before they are known to be usable.
    for name, value, low in (("--batch-bins", batch_bins, 1), ("--workers", workers, 1),
                             ("--gpus", gpus, 0)):
        if value is not None and value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value}.")
    if uncertainty == 1 or uncertainty < 0:
        raise InputError(f"--uncertainty must be 0 (no spreads) or at least 2 Monte Carlo "
                         f"samples, got {uncertainty}.")
    # Actors may run in another working directory (cluster jobs): pass absolute paths.
    store, model, out = (p if storage.is_url(p) else os.path.abspath(p) for p in (store, model, out))
    owned.check(out, "run")
    faults = _faults.active()
    want_dtype = requested_dtype(dtype)
    t0 = time.monotonic()
    n_stages = 3 if export else 2
    stage(1, n_stages, f"plan: store {store}, model {model}, run folder {out}")
    st = open_store(store)
    meta = load_meta(model)
    if uncertainty and not meta["model_config"].get("decoder_dropout"):
        raise InputError(f"--uncertainty needs a model trained with dropout, and {model} has "
                         "decoder_dropout 0: its Monte Carlo samples would all be equal. "
                         "Impute without --uncertainty, or train with decoder_dropout > 0.")
    targets_l = resolve_targets(targets, st, meta)
    cols, cells, assays = select_supports(st, meta)
    chrom_list = list(st.genome.subset(chroms).chroms)
    plan = st.chunks(chrom_list)
    recs = runfolder.target_records(targets_l, st)
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    info = runfolder.run_info(st, model, model_sha256(model), recs, chrom_list, plan,
                              [st.tracks[i].track_id for i in cols], uncertainty)

    old = runfolder.reconcile(out, info, force)
    final = runfolder.output_path(out)
    legacy = partial_path(final)  # where an earlier edice-dist wrote it aside

    array_keys = {c: st.array_key(c) for c in chrom_list}
    n_bins_total = info["bins"]
    K = len(recs)
    summary = {"tracks": K, "bins": n_bins_total, "target_bins": K * n_bins_total,
               "chunks_total": len(plan), "chunks_computed": 0, "chunks_skipped": len(plan),
               "actor_failures": 0, "peak_actor_rss_mib": None}
    computed_bins = 0
    if old is not None and runfolder.is_complete(final):
        log(f"imputation already complete in {final}; {len(plan)} chunks")
    else:
        import ray

        from . import raycluster
        from .imputepool import WorkerSpec, pool_shape, run_pool

        if storage.exists(legacy):
            log(f"note: {legacy} is an unfinished output of an earlier edice-dist; starting "
                "the imputation over")
            storage.remove(legacy)
        fresh = old is None or not storage.exists(storage.join(final, "zarr.json"))
        have = set() if fresh else done_set(final)
        todo = [c for c in plan if (array_keys[c.chrom], c.index) not in have]
        summary["chunks_skipped"] = len(plan) - len(todo)
        summary["chunks_computed"] = len(todo)
        computed_bins = sum(c.n_bins for c in todo)
        if todo:
            raycluster.init()
            node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]),
                            default=1)
            n_actors, options, threads = pool_shape(
                raycluster.cpu_slots(), raycluster.gpu_count(), workers, gpus, node_cpus,
                autoscaling=bool(os.environ.get("RAY_ADDRESS")))
            asked = want_dtype or "auto"
            if fresh:
                owned.claim(out, "run")
                runfolder.write(out, {**info, "created": runfolder.now(), "dtype": asked,
                                      "output_dtype": output_dtype(want_dtype)})
                runfolder.create_output(
                    final, st, chrom_list, recs, st.chunk_bins,
                    {"store": store, "model": model, "model_sha256": info["model_sha256"],
                     "uncertainty": uncertainty},
                    dtype=output_dtype(want_dtype), spread=bool(uncertainty))
            elif old.get("dtype") not in (None, asked):
                log(f"note: the remaining chunks are computed with dtype {asked}; the first "
                    f"ones with {old['dtype']}")
            where = f"{n_actors} GPU actor(s)" if options["num_gpus"] else \
                f"{n_actors} CPU actor(s) of {threads} CPU(s)"
            stage(2, n_stages, f"impute {K} tracks over {len(chrom_list)} chromosome(s): "
                  f"{len(todo)} of {len(plan)} chunks to compute ({len(plan) - len(todo)} done "
                  f"before) on {where}, dtype {want_dtype or 'chosen by each actor for its device'}")
            # The actors decide their device, dtype and threads themselves (where the work
            # runs: other nodes have other CPUs and GPUs than the driver).
            spec = WorkerSpec(model, store, final, out, cols, cells, assays,
                              np.array([ci[r["cell_key"]] for r in recs], dtype=np.int64),
                              np.array([ai[r["assay"]] for r in recs], dtype=np.int64),
                              array_keys, dtype=want_dtype, batch_bins=batch_bins,
                              samples=uncertainty, faults=faults)
            prog = Progress(len(todo), "imputing", unit="chunks")
            stats = run_pool(spec, todo, n_actors, options, prog)
            summary["actor_failures"] = stats["actor_failures"]
            if stats["actors"]:
                summary["peak_actor_rss_mib"] = max(a["peak_rss_mib"] for a in stats["actors"])
                summary["actors"] = stats["actors"]
                log(f"actors: {_actors_line(stats['actors'])}")
        else:
            stage(2, n_stages, "every chunk is already computed")
        check_complete(final, [(array_keys[c.chrom], c.index) for c in plan], "Imputation output")
        runfolder.mark_complete(final)
        done_info = {**runfolder.read(out), "completed": runfolder.now()}
        if summary.get("actors"):
            done_info["device"] = summary["actors"][0]["device"]
            done_info["actors"] = [{k: a[k] for k in ("device", "dtype", "threads", "node")}
                                   for a in summary["actors"]]
        runfolder.write(out, done_info)
    secs = time.monotonic() - t0
    summary["seconds"] = secs
    summary["target_bins_per_s"] = K * computed_bins / secs if secs > 0 else 0.0
    mem = (f", peak actor memory {summary['peak_actor_rss_mib']:.0f} MiB"
           if summary["peak_actor_rss_mib"] else "")
    log(f"imputed {K} tracks x {n_bins_total:,} bins ({K * n_bins_total:,} target-bins; "
        f"{summary['chunks_computed']} chunks computed, {summary['chunks_skipped']} skipped) in "
        f"{secs:.1f} s: {summary['target_bins_per_s']:,.0f} target-bins/s{mem}")
    if export:
        from .export import export as run_export

        stage(3, n_stages, "export bigWigs")
        summary["export"] = run_export(out, space=space, force=force, hub=hub, genome=genome,
                                       hub_observed=hub_observed, hub_email=hub_email)
    return summary
