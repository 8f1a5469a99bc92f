"""`edice ingest`: bigWig/bedGraph sources -> 25 bp means -> arcsinh -> the Zarr track store.

Stages:

1. validate: the manifest, the chromosome sizes and every source's header (Ray tasks;
   a bigWig in object storage is checked from its header bytes, not downloaded);
   bedGraphs are checked line by line and converted once to bigWig, kept in the
   ``.partial`` folder so that every task reads the same copy;
2. init: the driver creates every array in ``<out>.partial`` (see :func:`store.create`);
3. encode: one Ray task per source decodes it once into the track-major scratch
   (:mod:`edice_dist.scratch`; a source in object storage is downloaded once), then Ray
   tasks each own a *partition*, a contiguous run of whole chunks of one chromosome,
   read that block of every track from the scratch and write it transposed, chunk by
   chunk, each chunk followed by its done marker (memory: one block of all tracks);
4. finalise: every marker present -> scratch and markers dropped, ``.partial`` renamed
   to ``out``.

A re-run with the same inputs skips sources already decoded and chunks that have
markers. ``<out>.partial/_ingest.json`` holds a fingerprint of the inputs (manifest rows,
source sizes and modification times, chromosome sizes, chunk size, dtype, codec); a
re-run with other inputs starts the partial again. The finished store keeps the
fingerprint in its attributes, so re-running a completed ingest is a no-op.

The tests interrupt an ingest part-way with the ``ingest_fail_chunk`` fault
(:mod:`edice_dist._faults`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np

from . import _faults, _partial, owned, progress, scratch, storage
from . import store as store_mod
from .errors import EdiceError, InputError, explain
from .genome import Genome, read_chrom_sizes
from .tracks import Track, read_manifest

N_STAGES = 4
SOURCES_DIR = "_sources"
FINGERPRINT_FILE = "_ingest.json"
DTYPES = ("float16", "float32")
STORE_FILES = frozenset({"zarr.json", "signal"})
"""What a finished store holds; ``--force`` replaces a store only when it holds nothing else."""
MAX_PARTITION_CHUNKS = 16
"""Upper bound on chunks per encode task: enough to amortise a task's start, small
enough that a lost task costs little and the last tasks finish together."""


# ---------------------------------------------------------------- fingerprint
def _file_stat(path: str) -> dict | None:
    """Size and modification time (or ETag) of a source; None when it does not exist."""
    if not storage.is_url(path):
        try:
            st = os.stat(storage.filesystem(path)[1])
        except FileNotFoundError:
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, p = storage.filesystem(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return None
    stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
    return {"size": int(info.get("size") or 0), "stamp": str(stamp)}


def fingerprint(tracks: list[Track], stats: list[dict], genome: Genome, chunk_bins: int,
                dtype: str, codecs: list) -> str:
    """A hash of everything that determines the store's contents."""
    doc = {
        "format_version": store_mod.FORMAT_VERSION,
        "tracks": [t.to_json() for t in tracks],
        "stats": stats,
        "genome": genome.to_json(),
        "chunk_bins": chunk_bins,
        "dtype": dtype,
        "codec": [c.to_dict() for c in codecs],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- Ray tasks
def _remote(fn, **opts):
    import ray

    return ray.remote(**opts)(fn)


def _check_sources(items: list[tuple], full_json: list[dict], chroms: list[str],
                   bin_size: int) -> list[tuple]:
    """Open each source once: format, header, chromosomes; convert bedGraphs.

    ``items`` are (column, path, label, converted) with ``converted`` the place for a
    bedGraph's bigWig. Names are checked against the whole chromosome sizes file (a
    ``--chroms`` subset that a source lacks is zeros, not a naming mismatch). A bigWig
    given by URL is checked from its header bytes (:func:`bigwighead.read_header`): its
    values are read once, by the task that decodes it. Returns (column, path to read,
    warnings, error message or None).
    """
    from .bigwighead import read_header
    from .sources import check_chroms, open_source

    full = Genome.from_json(full_json, bin_size)
    out = []
    for col, path, label, converted in items:
        try:
            done = storage.exists(converted)  # converted by an earlier run, same inputs
            read = converted if done else path
            head = read_header(read, label, shown=path) if storage.is_url(read) else None
            with contextlib.ExitStack() as stack:
                s = head or stack.enter_context(open_source(read, full, label, shown=path))
                warnings = check_chroms(s, full, label)
                if not set(chroms) & set(s.chroms()):
                    warnings.append(f"{path} (track {label}) has no data on "
                                    f"{', '.join(chroms[:5])}: it reads as zeros there.")
                if s.kind == "bedgraph" and not done:
                    storage.upload(s.local, converted)
                    read = converted
            out.append((col, read, warnings, None))
        except EdiceError as e:
            out.append((col, None, [], str(e)))
    return out


def _encode_partition(partial: str, array_key: str, chrom: str, chunks: list[int],
                      chunk_bins: int, n_bins: int, faults: dict) -> tuple[int, str | None]:
    """Fill ``chunks`` of one chromosome's array from the scratch and mark each done.

    The partition's block of every track is read from the scratch once, then written
    transposed chunk by chunk. Returns (chunks written, error message or None); input
    errors are returned rather than raised so that the driver prints them as they are.
    """
    import zarr

    # Every chunk is written, all-zero ones too: a finished store has every chunk file,
    # so that a missing one reads as an error rather than as zeros (store.mark_complete).
    arr = zarr.open_group(storage.zarr_store(partial), mode="r+")["signal"][array_key]
    arr = arr.with_config({"write_empty_chunks": True})
    done = 0  # chunks of this partition now done, by this attempt or by a failed earlier one
    left = []
    for ci in chunks:
        if _partial.is_done(partial, array_key, ci):  # a retried task
            done += 1
        else:
            left.append(ci)
    if not left:
        return done, None
    lo, hi = left[0] * chunk_bins, min((left[-1] + 1) * chunk_bins, n_bins)
    try:
        block = scratch.read_block(partial, array_key, lo, hi)  # (tracks, bins)
    except EdiceError as e:
        return done, str(e)
    for ci in left:
        a, b = ci * chunk_bins, min((ci + 1) * chunk_bins, n_bins)
        if _faults.at_chunk(faults, "ingest_fail_chunk", chrom, ci):
            raise RuntimeError(f"fault injected at {chrom} chunk {ci} ({_faults.ENV})")
        if _faults.at_chunk(faults, "ingest_exit_chunk", chrom, ci):
            _faults.exit_once(partial, f"{chrom}\t{ci}")
        try:
            arr[a:b, :] = np.ascontiguousarray(block[:, a - lo:b - lo].T)
            _partial.mark_done(partial, array_key, ci)
        except OSError as e:  # a full disk, a read-only store: say where
            return done, (f"Writing {chrom} chunk {ci} (bins {a}-{b}) of "
                          f"{partial}: {explain(e)}")
        done += 1
    return done, None


# ---------------------------------------------------------------- driver
def _plan(chroms_json: list[dict], chunk_bins: int, done: set,
          per: int) -> tuple[list[tuple[str, str, list[int]]], int, int]:
    """Partitions (array key, chrom, chunk indices still to do) of ``per`` chunks, one
    scratch block each; chunks to do; all chunks."""
    total = sum(-(-c["n_bins"] // chunk_bins) for c in chroms_json)
    parts, todo = [], 0
    for c in chroms_json:
        n = -(-c["n_bins"] // chunk_bins)
        for lo in range(0, n, per):
            left = [i for i in range(lo, min(lo + per, n)) if (c["array"], i) not in done]
            if left:
                parts.append((c["array"], c["name"], left))
                todo += len(left)
    return parts, todo, total


def _run_tasks(calls: list[tuple[tuple, str]], task, cap: int, bar, partial: str,
               out: str, what: str) -> None:
    """Run ``task.remote(*args)`` for every (args, description) of ``calls``, at most
    ``cap`` at once; each returns (units done, error message or None). Stops at the first
    error, waits for the tasks still running, and raises it with what to do."""
    import ray

    pending, in_flight = list(calls), {}
    failure: EdiceError | None = None
    while (pending or in_flight) and failure is None:
        while pending and len(in_flight) < cap:
            args, desc = pending.pop(0)
            in_flight[task.remote(*args)] = desc
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        desc = in_flight.pop(ready[0])
        try:
            n, msg = ray.get(ready[0])
            failure = InputError(msg) if msg else None
        except Exception as e:  # a bug, or a worker lost more often than max_retries
            n = 0
            failure = EdiceError(f"The task for {desc} failed: {explain(e)}")
        bar.update(n)
    if failure is not None:
        _settle(in_flight)
        raise type(failure)(
            f"{failure} Nothing was written to {out}; the {what} finished so far are kept "
            f"in {partial}, and re-running the same command resumes from them."
        )


def _validate_sources(tracks, full, genome, partial, slots) -> list[str]:
    """Paths to read per column; raises one InputError listing the problems found."""
    import ray

    items = [(i, t.path, t.track_id, storage.join(partial, SOURCES_DIR, f"{i:06d}.bw"))
             for i, t in enumerate(tracks)]
    n_batches = max(1, min(len(items), 4 * slots))
    batches = [items[k::n_batches] for k in range(n_batches)]
    task = _remote(_check_sources, num_cpus=1, max_retries=2)
    fj, names = full.to_json(), list(genome.chroms)
    results = [r for rs in ray.get([task.remote(b, fj, names, genome.bin_size)
                                    for b in batches]) for r in rs]
    results.sort()
    errors = [msg for _, _, _, msg in results if msg]
    for _, _, warns, _ in results:
        for w in warns:
            progress.log(f"  warning: {w}")
    if errors:
        # One naming mistake usually hits every source: say it once, with a count.
        groups: dict[str, list[str]] = {}
        for col, _, _, msg in results:
            if msg:
                t = tracks[col]
                key = msg.replace(t.path, "\0").replace(t.track_id, "\1")
                groups.setdefault(key, []).append(msg)
        parts = [msgs[0] + (f" The same problem affects {len(msgs) - 1} more source(s)."
                            if len(msgs) > 1 else "") for msgs in groups.values()]
        more = f" ({len(parts) - 3} more problems not shown.)" if len(parts) > 3 else ""
        raise InputError(" ".join(parts[:3]) + more)
    return [read for _, read, _, _ in results]


def ingest(manifest: str, chrom_sizes: str, out: str, force: bool = False,
           chroms: list[str] | None = None, chunk_bins: int | None = None,
           dtype: str | None = None, workers: int | None = None) -> str:
    """Build the track store at ``out`` from a manifest of bigWig/bedGraph sources.

    Parameters
    ----------
    manifest, chrom_sizes, out : str
        Local paths or URLs.
    force : bool
        Replace a store at ``out`` that was built from other inputs (the old store stays
        until the new one is complete).
    chroms : list of str, optional
        Chromosomes to use (default: all of ``chrom_sizes``).
    chunk_bins : int, optional
        Bins per chunk (default :data:`store.DEFAULT_CHUNK_BINS`).
    dtype : {"float16", "float32"}, optional
        Store dtype (default :data:`store.DEFAULT_DTYPE`).
    workers : int, optional
        Most tasks running at once (default: every CPU slot Ray reports).

    Returns
    -------
    str
        ``out``.
    """
    manifest, chrom_sizes, out = map(storage.absolute, (manifest, chrom_sizes, out))

    from . import raycluster

    chunk_bins = store_mod.DEFAULT_CHUNK_BINS if chunk_bins is None else int(chunk_bins)
    dtype = dtype or store_mod.DEFAULT_DTYPE
    if chunk_bins <= 0:
        raise InputError(f"--chunk-bins must be a positive number of bins, got {chunk_bins}.")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if workers is not None and workers <= 0:
        raise InputError(f"--workers must be positive, got {workers}.")

    progress.stage(1, N_STAGES, f"validate {manifest} and {chrom_sizes}")
    tracks = read_manifest(manifest)
    full = read_chrom_sizes(chrom_sizes)
    genome = full.subset(chroms)
    stats = [_file_stat(t.path) for t in tracks]
    missing = [t for t, st in zip(tracks, stats, strict=True) if st is None]
    if missing:
        show = "; ".join(f"{t.path} (track {t.track_id})" for t in missing[:3])
        what = (f"The source file {show} listed in {manifest} does not exist"
                if len(missing) == 1 else
                f"{len(missing)} source files listed in {manifest} do not exist: {show}"
                f"{'; ...' if len(missing) > 3 else ''}")
        raise InputError(f"{what}. Fix the paths (relative paths are relative to the "
                         "manifest's folder) and re-run.")
    codecs = store_mod.default_codecs(dtype)
    fp = fingerprint(tracks, stats, genome, chunk_bins, dtype, codecs)
    partial = _partial.partial_path(out)
    # Only a store (or an unfinished one) is ever replaced: never a folder of other files.
    owned.check(out, "store")
    owned.check(partial, "store", flag="--out's unfinished store")

    if storage.exists(storage.join(out, "zarr.json")):
        attrs = (_read_json(storage.join(out, "zarr.json")) or {}).get("attributes", {})
        if attrs.get("ingest_fingerprint") == fp:
            progress.log(f"{out} is up to date (same manifest, sources and settings); "
                         "nothing to do.")
            return out
        if not force:
            raise InputError(
                f"A different track store already exists at {out} (built from other inputs "
                "or settings). Choose another --out, or pass --force to replace it; the old "
                "store is kept until the new one is complete."
            )
        owned.check_replace(out, STORE_FILES)
        progress.log(f"  {out} exists and will be replaced when the new store is complete "
                     "(--force).")

    fp_path = storage.join(partial, FINGERPRINT_FILE)
    resume = (_read_json(fp_path) or {}).get("fingerprint") == fp
    if not resume:
        if storage.exists(partial):
            progress.log(f"  {partial} was made from other inputs: starting it again.")
            storage.remove(partial)
        # Written first: it also marks the folder as an unfinished store (owned.RECORDS).
        storage.write_text_atomic(fp_path, json.dumps({"fingerprint": fp,
                                                       "format": store_mod.FORMAT}) + "\n")

    raycluster.init()
    slots = raycluster.cpu_slots()
    try:
        read_paths = _validate_sources(tracks, full, genome, partial, slots)
    except EdiceError:
        if not resume:  # nothing worth keeping: fixing the input changes the fingerprint
            storage.remove(partial)
        raise
    progress.log(f"  {len(tracks)} tracks, {len(genome.chroms)} chromosomes, "
                 f"{genome.total_bins:,} bins of {genome.bin_size} bp")

    progress.stage(2, N_STAGES, f"init {partial} ({dtype}, chunks of {chunk_bins} bins)")
    if not storage.exists(storage.join(partial, "zarr.json")):
        store_mod.create(partial, genome, tracks, chunk_bins=chunk_bins, dtype=dtype,
                         compressors=codecs, overwrite=False,
                         extra_attrs={"ingest_fingerprint": fp,
                                      "ingest_inputs": {"manifest": manifest,
                                                        "chrom_sizes": chrom_sizes}})
    chroms_json = _read_json(storage.join(partial, "zarr.json"))["attributes"]["chroms"]
    done = _partial.done_set(partial)
    total = sum(-(-c["n_bins"] // chunk_bins) for c in chroms_json)
    per = scratch.stored_block_chunks(partial) or scratch.block_chunks(
        len(tracks), chunk_bins, np.dtype(dtype).itemsize, total, slots, MAX_PARTITION_CHUNKS)
    parts, todo, total = _plan(chroms_json, chunk_bins, done, per)
    if total - todo:
        progress.log(f"  resuming: {total - todo} of {total} chunks already written")

    cap = max(1, workers or slots)
    decoded = scratch.decoded(partial) if todo else set(range(len(tracks)))
    to_decode = [i for i in range(len(tracks)) if i not in decoded]
    progress.stage(3, N_STAGES, f"encode {todo} chunks x {len(tracks)} tracks: "
                   f"{len(to_decode)} source(s) to decode once, then {len(parts)} tasks "
                   f"({cap} at a time)")
    if to_decode:
        if not storage.exists(scratch.path(partial)):
            scratch.create(partial, chroms_json, len(tracks), chunk_bins, per, dtype)
        gj = genome.to_json()
        calls = [((partial, i, read_paths[i], tracks[i].path, tracks[i].track_id,
                   chroms_json, gj, genome.bin_size, dtype),
                  f"source {tracks[i].path} (track {tracks[i].track_id})") for i in to_decode]
        _run_tasks(calls, _remote(scratch.decode_source, num_cpus=1, max_retries=3),
                   min(cap, len(calls)), progress.Progress(len(calls), "decode", unit="sources"),
                   partial, out, "decoded sources and chunks")
    faults = _faults.active()
    n_bins = {c["array"]: int(c["n_bins"]) for c in chroms_json}
    calls = [((partial, key, chrom, idx, chunk_bins, n_bins[key], faults),
              f"{chrom} chunks {idx[0]}..{idx[-1]}") for key, chrom, idx in parts]
    _run_tasks(calls, _remote(_encode_partition, num_cpus=1, max_retries=3),
               min(cap, len(calls) or 1), progress.Progress(todo, "encode", unit="chunks"),
               partial, out, "chunks")

    progress.stage(4, N_STAGES, f"finalise {out}")
    expected = [(c["array"], i) for c in chroms_json
                for i in range(-(-c["n_bins"] // chunk_bins))]
    _partial.check_complete(partial, expected, "Track store")
    scratch.remove(partial)
    store_mod.mark_complete(partial)
    storage.remove(storage.join(partial, SOURCES_DIR))
    storage.remove(fp_path)
    _partial.finalise(partial, out)
    progress.log(f"  wrote {out}: {len(tracks)} tracks x {genome.total_bins:,} bins")
    return out


def _settle(in_flight: dict) -> None:
    """Stop the remaining tasks and wait for them, so no writer outlives the driver."""
    import ray

    for ref in in_flight:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    for ref in in_flight:
        with contextlib.suppress(Exception):
            ray.get(ref)
