"""The imputation run folder: its layout, ``run.json``, the output store and the bigWig
names; what ``edice impute`` writes, ``edice export`` and ``edice evaluate`` read and
``edice info`` describes.

```
RUN_DIR/
  run.json            what the run is: store and model fingerprints, targets, chroms, ...
  imputed.zarr/       Zarr v3 group, one array per chromosome: (n_targets, n_bins),
                      arcsinh(-log10 p); float16 (its rounding is well below the bf16
                      compute's), float32 when float32 was asked for; compressed
                      (:func:`output_codecs`); written in place, chunk by chunk, each
                      followed by its done marker (_done/), and complete only once its
                      root attribute ``completed`` is written, last
                      (with --uncertainty, one more array per chromosome, <array>_spread:
                      the spread of Monte Carlo dropout samples, arcsinh units)
  bigwig/             <cell_key>-<assay>.bigWig per target (and <...>.spread.bigWig with
                      --uncertainty), manifest.tsv, export.json,
                      and the UCSC track hub of them: hub.txt, genomes.txt, trackDb.txt
                      (observed/ with hub_observed copy or link; :mod:`edice_dist.hub`)
```

``run.json`` keys: ``format``, ``format_version``, ``tool_version``, ``store``,
``store_fingerprint`` (:meth:`TrackStore.identity`'s ``sha256``), ``model``,
``model_sha256``, ``targets`` (records of :func:`target_records`), ``chroms``,
``chunk_bins``, ``n_chunks``, ``bins``, ``supports`` (track ids), ``transform``,
``uncertainty`` (Monte Carlo samples; only when > 0); then
``created``, ``dtype`` (the compute dtype asked for, ``auto`` when each actor chooses from
its device) and ``output_dtype`` when the output store is made, and ``completed``,
``device`` and ``actors`` (device, dtype and threads each actor chose) when it is
finished. A run resumes only when the keys of :data:`COMPAT` are unchanged.

Why in place: on an object store a rename copies every object (~0.5 TB for 2,000 targets
over hg38), so the output store is written under its final name and trusted only once
complete: :func:`finished_output` (the export, ``edice evaluate``'s provenance) refuses a
store without ``completed``, and ``edice impute`` resumes it from its done markers.
"""

from __future__ import annotations

import datetime as _dt
import json

from . import __version__, storage
from ._partial import DONE, done_set, partial_path
from .errors import EdiceError, InputError
from .tracks import cell_key, check_distinct_names, check_name, split_cell_key, track_id

RUN_FORMAT = "edice-imputation-run"
OUTPUT_FORMAT = "edice-imputation"
FORMAT_VERSION = 1
RUN_JSON = "run.json"
OUTPUT = "imputed.zarr"
BIGWIG = "bigwig"
BIGWIG_MANIFEST = "manifest.tsv"
EXPORT_JSON = "export.json"
SPREAD = "spread"
COMPLETED = "completed"
"""Root attribute of a finished output store (when it was finished), written last."""
COMPAT = ("store_fingerprint", "model_sha256", "targets", "chroms", "chunk_bins", "uncertainty")
"""Run settings that must match to resume a run folder (the rest is informational)."""


# ----------------------------------------------------------------------------- names


def bigwig_name(track_id_: str) -> str:
    """The bigWig file name of a track (SPEC section 3): ``<cell_key>-<assay>.bigWig``."""
    return f"{track_id_}.bigWig"


def spread_name(track_id_: str) -> str:
    """The bigWig file name of a track's spread: ``<cell_key>-<assay>.spread.bigWig``."""
    return f"{track_id_}.{SPREAD}.bigWig"


def spread_array(key: str) -> str:
    """The output store's array of the spreads of chromosome array ``key``."""
    return f"{key}_{SPREAD}"


def run_files(info: dict) -> list[str]:
    """Every bigWig name the export of run ``info`` writes: the targets', then their
    spreads' when the run has them."""
    names = [bigwig_name(r["track_id"]) for r in info["targets"]]
    if info.get("uncertainty"):
        names += [spread_name(r["track_id"]) for r in info["targets"]]
    return names


def bigwig_dir(run_dir: str) -> str:
    return storage.join(run_dir, BIGWIG)


def bigwig_path(run_dir: str, record: dict) -> str:
    """Where the bigWig of a target record goes: inside ``RUN_DIR/bigwig`` or refused."""
    return storage.child(bigwig_dir(run_dir), bigwig_name(record["track_id"]),
                         what=f"the track id of target {record.get('cell_key')}:"
                              f"{record.get('assay')}")


def check_targets(records: list[dict], where: str) -> None:
    """The target records of a ``run.json`` or an output store, read back: every name by
    the one name rule, each track id the one its names give, no two alike."""
    if not isinstance(records, list) or not records:
        raise InputError(f"{where} lists no targets: it is damaged. Re-run `edice impute` "
                         "with --force.")
    for r in records:
        try:
            check_name(r["cell_type"], "cell type", where)
            check_name(r["assay"], "assay", where)
            if r["individual"]:
                check_name(r["individual"], "individual", where)
            ok = (r["cell_key"] == cell_key(r["cell_type"], r["individual"])
                  and r["track_id"] == track_id(r["cell_key"], r["assay"]))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise InputError(f"{where}: the target record {r!r} is inconsistent: the run "
                             "folder is damaged. Re-run `edice impute` with --force.")
    check_distinct_names([(r["cell_key"], r["assay"]) for r in records], where)


def output_path(run_dir: str) -> str:
    """The output store, written in place; finished once :func:`is_complete`."""
    return storage.join(run_dir, OUTPUT)


def is_complete(out_zarr: str) -> bool:
    """True when the output store at ``out_zarr`` has its completion record."""
    meta = storage.join(out_zarr, "zarr.json")
    if not storage.exists(meta):
        return False
    try:
        attrs = json.loads(storage.read_text(meta)).get("attributes", {})
    except (OSError, ValueError):
        return False
    return bool(attrs.get(COMPLETED))


def mark_complete(out_zarr: str) -> None:
    """Record that every chunk of the output store is written (callers check the done
    markers first), then drop the markers: bookkeeping, not part of the result.

    The record is one rewrite of the root ``zarr.json`` (a single PUT on an object store):
    nothing is copied, whatever the size of the store."""
    import zarr

    root = zarr.open_group(storage.zarr_store(out_zarr), mode="r+")
    root.attrs[COMPLETED] = now()
    storage.remove(storage.join(out_zarr, DONE))


def is_run(path: str) -> bool:
    return storage.exists(storage.join(path, RUN_JSON))


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- run.json


def target_records(targets: list[tuple[str, str]], store) -> list[dict]:
    """The ``targets`` of ``run.json`` and of the output store: one record per
    (cell_key, assay) with ``cell_type``, ``individual``, ``track_id`` and ``observed``
    (the split of that pair in ``store``, or "")."""
    observed = {(t.cell_key, t.assay): t.split for t in store.tracks}
    out = []
    for c, a in targets:
        cell, ind = split_cell_key(c)
        out.append({"cell_key": c, "assay": a, "cell_type": cell, "individual": ind,
                    "track_id": track_id(cell_key(cell, ind), a),
                    "observed": observed.get((c, a), "")})
    return out


def run_info(store, model: str, model_sha256: str, targets: list[dict], chroms: list[str],
             plan: list, supports: list[str], uncertainty: int = 0) -> dict:
    """The settings part of ``run.json`` (see the module docstring).

    Parameters
    ----------
    store : the open TrackStore; model : the model folder.
    targets : :func:`target_records`; chroms, plan : the run's chromosomes and chunks.
    supports : track ids of the support tracks.
    uncertainty : Monte Carlo dropout samples per bin (0: no spreads; then no key, so that
        run folders made before spreads existed still resume).
    """
    info = {
        "format": RUN_FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
        "store": store.path, "store_fingerprint": store.identity()["sha256"],
        "model": model, "model_sha256": model_sha256,
        "targets": targets, "chroms": chroms,
        "chunk_bins": store.chunk_bins, "n_chunks": len(plan),
        "bins": sum(c.n_bins for c in plan), "supports": supports, "transform": store.transform,
    }
    if uncertainty:
        info["uncertainty"] = int(uncertainty)
    return info


def read(run_dir: str) -> dict | None:
    """``run.json`` of ``run_dir`` with its targets checked; None when there is none."""
    info = storage.read_json(storage.join(run_dir, RUN_JSON),
                             "Re-run with --force to start this run over.")
    if info is not None:
        check_targets(info.get("targets"), storage.join(run_dir, RUN_JSON))
    return info


def write(run_dir: str, info: dict) -> None:
    storage.write_text_atomic(storage.join(run_dir, RUN_JSON), json.dumps(info, indent=2) + "\n")


def differences(old: dict, new: dict) -> list[str]:
    """Readable differences between two runs in the keys of :data:`COMPAT`."""
    out = []
    for k in COMPAT:
        if old.get(k) != new.get(k):
            if k == "targets":
                o = {(t["cell_key"], t["assay"]) for t in old.get(k) or []}
                n = {(t["cell_key"], t["assay"]) for t in new[k]}
                out.append(f"targets ({len(o)} before, {len(n)} now; {len(n - o)} added, "
                           f"{len(o - n)} removed)")
            elif k == "model_sha256":
                out.append(f"model ({old.get('model')} sha256 {str(old.get(k))[:12]} -> "
                           f"{new['model']} sha256 {new[k][:12]})")
            elif k == "store_fingerprint":
                out.append(f"store ({old.get('store')} -> {new['store']}, contents differ)")
            else:
                out.append(f"{k} ({old.get(k)} -> {new.get(k)})")
    return out


def wipe(run_dir: str, info: dict | None = None) -> None:
    """Remove what a run writes, and nothing else: the output store, ``run.json`` and, in
    ``bigwig/``, the files that the export of the run ``info`` describes writes."""
    bw = bigwig_dir(run_dir)
    if info is not None and storage.exists(bw):
        names = set(run_files(info))
        names |= {BIGWIG_MANIFEST, EXPORT_JSON} | {f".{n}.tmp" for n in names}
        for n in storage.list_dir(bw):
            if n in names:
                storage.remove(storage.join(bw, n))
        if not storage.is_url(bw) and not storage.list_dir(bw):
            storage.remove(bw)
    for name in (OUTPUT, partial_path(OUTPUT), RUN_JSON):
        storage.remove(storage.join(run_dir, name))


def reconcile(run_dir: str, info: dict, force: bool) -> dict | None:
    """The run already in ``run_dir`` that a run described by ``info`` continues.

    Returns the old ``run.json`` when the run can resume; None when there is nothing to
    resume (what was there is removed: with ``force``, or output without a ``run.json``,
    whose settings are unknown).

    Raises
    ------
    InputError
        ``run_dir`` holds a run with other settings and ``force`` is not set.
    """
    from .progress import log

    old = read(run_dir)
    if old is not None:
        diff = differences(old, info)
        if diff and not force:
            raise InputError(
                f"Run folder {run_dir} holds a run with other settings: {'; '.join(diff)}. "
                "Use another --out, or add --force to discard that run and start over."
            )
        if force:
            log(f"--force: discarding the run in {run_dir}")
            wipe(run_dir, old)
            return None
        return old
    if storage.exists(partial_path(output_path(run_dir))) or storage.exists(output_path(run_dir)):
        wipe(run_dir)
    return None


# ----------------------------------------------------------------------------- output store


def output_codecs(dtype: str) -> list:
    """The output store's codecs: :func:`edice_dist.store.fast_codecs` (blosc lz4 with
    bit shuffling, CRC32C), chosen by measurement at 2,000 targets (BENCHMARKS.md,
    Imputation, output codec)."""
    from .store import fast_codecs

    return fast_codecs(dtype)


def create_output(path: str, store, chroms: list[str], targets: list[dict], chunk_bins: int,
                  attrs: dict, dtype: str = "float32", spread: bool = False):
    """Create the output group at ``path`` (in place; complete once :func:`mark_complete`
    has run): one ``dtype`` array per chromosome, shape (n_targets, n_bins), filled with
    NaN until computed; with ``spread`` a second one per chromosome (:func:`spread_array`)
    for the spreads.

    Each shard is (n_targets, chunk_bins), owned by one writer; its inner chunks are
    (1, chunk_bins) so that the reducer reads one target without decoding the others.
    """
    import zarr

    K = len(targets)
    root = zarr.open_group(storage.zarr_store(path), mode="w", zarr_format=3)
    meta = []
    for c in store.attrs["chroms"]:
        if c["name"] not in chroms:
            continue
        nb = int(c["n_bins"])
        cb = min(chunk_bins, max(nb, 1))
        for key in [c["array"], *([spread_array(c["array"])] if spread else [])]:
            root.create_array(key, shape=(K, nb), chunks=(1, cb), shards=(K, cb),
                              dtype=dtype, fill_value=float("nan"),
                              compressors=output_codecs(dtype),
                              dimension_names=("target", "bin"), write_data=False)
        meta.append({"name": c["name"], "size": int(c["size"]), "n_bins": nb, "array": c["array"]})
    root.attrs.update({"format": OUTPUT_FORMAT, "format_version": FORMAT_VERSION,
                       "tool": "edice-dist", "tool_version": __version__,
                       "targets": targets, "transform": "arcsinh",
                       "value_space": "arcsinh(-log10 p), model output per 25 bp bin",
                       "bin_size": store.genome.bin_size, "chunk_bins": chunk_bins,
                       "chroms": meta, **attrs})
    return root


def finished_output(run_dir: str) -> tuple[str, dict]:
    """(path, root attributes) of the finished output store of ``run_dir``.

    Raises
    ------
    EdiceError
        The imputation is not finished (its ``.partial`` store exists).
    InputError
        There is no imputation output at all.
    """
    import zarr

    out_zarr = output_path(run_dir)
    if not is_complete(out_zarr):
        started = storage.exists(storage.join(out_zarr, "zarr.json"))
        if started or storage.exists(partial_path(out_zarr)):  # (an older edice's partial)
            what = OUTPUT if started else partial_path(OUTPUT)
            raise EdiceError(
                f"The imputation in {run_dir} is not finished ({what} is not complete). Run "
                "the same `edice impute` command again to complete it; it exports at the end."
            )
        raise InputError(f"{run_dir} holds no imputation output ({out_zarr} is missing). "
                         "Run `edice impute --out RUN_DIR` first.")
    group = zarr.open_group(storage.zarr_store(out_zarr, read_only=True), mode="r")
    attrs = dict(group.attrs)
    check_targets(attrs.get("targets"), out_zarr)
    return out_zarr, attrs


def describe(run_dir: str) -> str:
    """What ``edice info RUN_DIR`` prints: settings, chunks done/total, bigWigs written."""
    info = read(run_dir)
    if info is None:
        raise InputError(f"{run_dir} has no run.json: it is not an imputation run folder.")
    final = output_path(run_dir)
    n = int(info.get("n_chunks", 0))
    if is_complete(final):
        done, status = n, "imputation complete"
    elif storage.exists(storage.join(final, "zarr.json")):
        done, status = len(done_set(final)), "imputation in progress or interrupted (re-run to resume)"
    else:
        done, status = 0, "imputation not started"
    recs = info["targets"]
    bw_dir = bigwig_dir(run_dir)
    names = set(storage.list_dir(bw_dir))
    files = run_files(info)
    written = sum(f in names for f in files)
    shown = ", ".join(f"{r['cell_key']}:{r['assay']}" for r in recs[:10])
    lines = [
        f"imputation run {run_dir}",
        f"created        {info.get('created')} (edice-dist {info.get('tool_version')})",
        f"store          {info['store']}",
        f"model          {info['model']} (sha256 {info['model_sha256'][:12]})",
        f"targets        {len(recs)}: {shown}{', ...' if len(recs) > 10 else ''}",
        f"supports       {len(info.get('supports', []))} observed tracks",
        f"chromosomes    {len(info['chroms'])}: {', '.join(info['chroms'][:10])}"
        f"{', ...' if len(info['chroms']) > 10 else ''} ({info.get('bins', 0):,} bins)",
        f"chunks         {done}/{n} done ({info['chunk_bins']} bins each); {status}",
        f"bigWigs        {written}/{len(files)} written in {bw_dir}"
        + (f" (with spreads of {info['uncertainty']} Monte Carlo samples)"
           if info.get("uncertainty") else ""),
    ]
    if "hub.txt" in names:
        lines.append(f"track hub      {storage.join(bw_dir, 'hub.txt')}")
    return "\n".join(lines)
