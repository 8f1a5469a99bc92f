"""The reducer: an imputation run's output store -> one bigWig per target.

```
RUN_DIR/bigwig/
  <cell_key>-<assay>.bigWig   every chromosome of the run in chrom.sizes order, fixed
                              25 bp steps, the last bin clipped to the chromosome's end
  manifest.tsv                cell_type, assay, individual, path (relative to this folder)
  export.json                 the value space the files are in
  hub.txt, genomes.txt, trackDb.txt   the UCSC track hub of these files (:mod:`edice_dist.hub`)
```

One Ray task per target streams that target's row chunk by chunk (one inner chunk of
the output store per read), so a task's memory does not grow with the genome. Each file
is written aside (``.<name>.tmp``) and renamed when complete; for URL run folders it is
written locally and uploaded.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from . import hub as _hub
from . import owned, runfolder, spaces, storage
from .errors import EdiceError, InputError, explain
from .progress import Progress, log
from .runfolder import bigwig_name


def write_bigwig(out_zarr: str, k: int, dest: str, space: str = "pval",
                 spread: bool = False) -> int:
    """Write target ``k`` of the output store ``out_zarr`` as a bigWig at ``dest``.

    Reads the target's row one stored chunk at a time per chromosome. ``dest`` appears
    only when the file is complete. ``spread``: the target's spread instead, which stays
    in arcsinh units whatever ``space`` is (a standard deviation has no -log10 p value).

    Returns
    -------
    int
        Bins written.

    Raises
    ------
    EdiceError
        A value is not finite (an uncomputed chunk, or an overflow in -log10 p space);
        the message names the target, chromosome and bins. Any other failure (a full
        disk, a damaged output store) names the target and the file.
    """
    try:
        return _write_bigwig(out_zarr, k, dest, space, spread)
    except EdiceError:
        raise
    except Exception as e:
        raise EdiceError(f"Exporting target {k} of {out_zarr} to {dest} failed: "
                         f"{explain(e)}") from e


def _write_bigwig(out_zarr: str, k: int, dest: str, space: str, spread: bool) -> int:
    import pyBigWig
    import zarr

    root = zarr.open_group(storage.zarr_store(out_zarr, read_only=True), mode="r")
    attrs = dict(root.attrs)
    rec = attrs["targets"][k]
    bin_size = int(attrs["bin_size"])
    chroms = attrs["chroms"]
    step = int(attrs["chunk_bins"])
    name = storage.basename(dest)  # checked by the driver (runfolder.bigwig_path)
    if storage.is_url(dest):
        tmpdir = tempfile.mkdtemp(prefix="edice-export-")
        tmp = os.path.join(tmpdir, name)
    else:
        tmpdir = None
        dest = os.path.abspath(dest)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = os.path.join(os.path.dirname(dest), f".{name}.tmp")
    bw = pyBigWig.open(tmp, "w")
    if bw is None:
        raise EdiceError(f"Cannot create {tmp} for writing (is the folder writable?).")
    n_written = 0
    try:
        # The header must come before any entry (pyBigWig crashes otherwise).
        bw.addHeader([(c["name"], int(c["size"])) for c in chroms])
        for c in chroms:
            key = runfolder.spread_array(c["array"]) if spread else c["array"]
            arr = root[key]
            size, nb = int(c["size"]), int(c["n_bins"])
            if arr.shape != (len(attrs["targets"]), nb):
                raise EdiceError(f"{out_zarr}/{key} has shape {arr.shape}, expected "
                                 f"({len(attrs['targets'])}, {nb}): the output store is damaged.")
            for start in range(0, nb, step):
                stop = min(start + step, nb)
                vals = spaces.to_space(arr[k, start:stop], "arcsinh" if spread else space)
                bad = ~np.isfinite(vals)
                if bad.any():
                    first = start + int(np.argmax(bad))
                    raise EdiceError(
                        f"Target {rec['track_id']} has {int(bad.sum())} non-finite values on "
                        f"{c['name']} (first at bin {first}, {first * bin_size} bp) in {out_zarr}. "
                        "NaN marks a chunk that was never computed: re-run `edice impute` with "
                        "--force to recompute the run."
                    )
                last_partial = stop == nb and size % bin_size != 0
                full = vals[:-1] if last_partial else vals
                if len(full):
                    bw.addEntries(c["name"], start * bin_size, values=full, span=bin_size,
                                  step=bin_size)
                if last_partial:
                    # The last bin ends at the chromosome's end (pyBigWig would accept an
                    # interval past it and write a file other tools reject).
                    s0 = (nb - 1) * bin_size
                    bw.addEntries(c["name"], s0, values=vals[-1:], span=size - s0, step=size - s0)
                n_written += stop - start
        bw.close()
        bw = None
        if tmpdir is None:
            os.replace(tmp, dest)
        else:
            storage.upload(tmp, dest)
    finally:
        if bw is not None:
            bw.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        if tmpdir is not None:
            os.rmdir(tmpdir)
    return n_written


def _manifest(records: list[dict], spread: bool = False) -> str:
    lines = ["cell_type\tassay\tindividual\tpath" + ("\tspread_path" if spread else "")]
    for r in records:
        lines.append(f"{r['cell_type']}\t{r['assay']}\t{r['individual']}\t"
                     f"{bigwig_name(r['track_id'])}"
                     + (f"\t{runfolder.spread_name(r['track_id'])}" if spread else ""))
    return "\n".join(lines) + "\n"


def export(run_dir: str, space: str = "pval", force: bool = False,
           workers: int | None = None, hub: bool = True, genome: str | None = None,
           hub_observed: str = "none", hub_email: str = _hub.DEFAULT_EMAIL) -> dict:
    """``edice export RUN_DIR``: one bigWig per target of a finished imputation run.

    Parameters
    ----------
    run_dir : the run folder of ``edice impute``.
    space : ``pval`` (-log10 p; default) or ``arcsinh``.
    force : rewrite bigWigs that exist (needed to change ``space``).
    workers : concurrent tasks (default: as many as Ray has CPUs).
    hub : write the UCSC track hub beside the bigWigs. Always by default: it is three small
        text files that make the folder viewable by URL in a genome browser.
    genome : the hub's UCSC assembly (default: recognised from the chromosome sizes).
    hub_observed : ``none``, ``link`` or ``copy``: the store's observed bigWigs in the hub.
    hub_email : the hub's contact address.

    Returns
    -------
    dict
        ``files`` (written now), ``skipped``, ``bins`` (per file), ``seconds``,
        ``bins_per_s`` (target-bins written per second), ``manifest``, ``hub`` (what
        :func:`edice_dist.hub.write_run_hub` returned, or None).
    """
    import ray

    from . import raycluster

    spaces.check(space)
    _hub.check_genome(genome)
    out_zarr, attrs = runfolder.finished_output(run_dir)
    owned.check(run_dir, "run", flag="RUN_DIR")
    records = attrs["targets"]
    spread = bool(attrs.get("uncertainty"))
    # One task per file: (target, destination, spread or not).
    jobs = [(k, runfolder.bigwig_path(run_dir, r), False) for k, r in enumerate(records)]
    if spread:
        bw = runfolder.bigwig_dir(run_dir)
        jobs += [(k, storage.join(bw, runfolder.spread_name(r["track_id"])), True)
                 for k, r in enumerate(records)]
    files = [storage.basename(d) for _, d, _ in jobs]
    bins = sum(int(c["n_bins"]) for c in attrs["chroms"])
    bw_dir = runfolder.bigwig_dir(run_dir)
    storage.makedirs(bw_dir)
    info_path = storage.join(bw_dir, runfolder.EXPORT_JSON)
    names = set(storage.list_dir(bw_dir))
    if storage.exists(info_path) and not force:
        before = json.loads(storage.read_text(info_path)).get("space")
        if before != space and any(f in names for f in files):
            raise InputError(
                f"The bigWigs in {bw_dir} hold {before} values; rewrite them as {space} with "
                f"`edice export {run_dir} --space {space} --force`."
            )
    if force:  # so that an interrupted forced export never leaves files of two spaces
        for f in files:
            if f in names:
                storage.remove(storage.join(bw_dir, f))
        names = set()
    storage.write_text_atomic(info_path, json.dumps({"space": space, "run": run_dir}) + "\n")
    todo = [i for i, f in enumerate(files) if f not in names]
    t0 = time.monotonic()
    if todo:
        raycluster.init()
        n = workers or raycluster.cpu_slots()
        task = ray.remote(write_bigwig).options(num_cpus=1, max_retries=2)
        log(f"export: {len(todo)} bigWig(s) ({len(jobs) - len(todo)} exist) in {space} space"
            + (" (spreads in arcsinh units)" if spread else "") + ", "
            f"{bins:,} bins each, {n} at a time -> {bw_dir}")
        prog = Progress(len(todo), "exporting", unit="bigWigs")
        queue = list(todo)
        running: dict = {}
        try:
            while queue or running:
                while queue and len(running) < n:
                    i = queue.pop(0)
                    running[task.remote(out_zarr, *jobs[i][:2], space, jobs[i][2])] = i
                ready, _ = ray.wait(list(running), num_returns=1)
                running.pop(ready[0])
                try:
                    ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, EdiceError):
                        raise e.cause from e
                    raise
                prog.update()
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
    secs = time.monotonic() - t0
    manifest = storage.join(bw_dir, runfolder.BIGWIG_MANIFEST)
    storage.write_text_atomic(manifest, _manifest(records, spread))
    rate = len(todo) * bins / secs if todo and secs > 0 else 0.0
    if todo:
        log(f"exported {len(todo)} bigWig(s) x {bins:,} bins in {secs:.1f} s: "
            f"{rate:,.0f} bins/s; manifest {manifest}")
    hub_info = None
    if hub:  # after the bigWigs: every file the hub names exists when it appears
        hub_info = _hub.write_run_hub(run_dir, records, attrs["chroms"], space, genome=genome,
                                      observed=hub_observed, email=hub_email, spread=spread)
    return {"files": len(todo), "skipped": len(jobs) - len(todo), "bins": bins,
            "seconds": secs, "bins_per_s": rate, "manifest": manifest, "hub": hub_info}
