"""The ingest's track-major scratch: every source decoded once, into its own row.

A store chunk holds every track (bins x tracks), so the task that writes it needs every
source. Opening every source in every partition task is cheap on a local disk (pyBigWig
reads only the windows it needs) but not in object storage, where opening a source means
downloading it: at Roadmap scale (~1,000 sources x ~500 partitions) hundreds of TB. So
ingest decodes each source once, in one Ray task, into its row of a scratch array per
chromosome, and the partition tasks read blocks of all rows and write them transposed
into the store::

    STORE.partial/_scratch/        Zarr v3 group beside the store's own arrays
      <array_key>                  (n_tracks, n_bins), store dtype, chunks (1, block_bins):
                                   one track x one partition's bins per chunk
      _done/sources/<column>       written after every block of that source

``block_bins`` is a whole number of store chunks and a partition never crosses a block,
so an encode task reads one scratch chunk per track. Values are final (25 bp means,
arcsinh, cast to the store dtype): the store holds exactly what the scratch holds.

Memory is flat in genome length: a decode task holds one store chunk of one track (and
the source's local copy on disk), an encode task one block of all tracks
(:data:`BLOCK_BYTES` at most). The scratch is about the size of the store; it is written
once, read once and removed when the store is complete.
"""

from __future__ import annotations

import numpy as np

from . import _partial, storage
from .errors import EdiceError, explain

SCRATCH = "_scratch"
DECODED = "sources"  # done-marker key of decoded sources
BLOCK_BYTES = 64 * 2**20
"""Most bytes of one encode task's block of all tracks: 2 chunks of 16,384 bins at 1,000
float16 tracks, 4 at 250 (never less than one chunk). An encode task holds its block a few
times over while it transposes it, so this is what grows with the tracks: 256 MB blocks
made ingest's peak at 1,000 tracks 1.49x that at 250 (BENCHMARKS.md, issue 22). Smaller
blocks mean more, smaller scratch objects."""


def path(partial: str) -> str:
    return storage.join(partial, SCRATCH)


def block_chunks(n_tracks: int, chunk_bins: int, itemsize: int, total_chunks: int,
                 slots: int, most: int) -> int:
    """Store chunks per partition and per scratch block.

    Enough partitions that every CPU slot gets several (the last ones finish together), at
    most ``most`` chunks, and at most :data:`BLOCK_BYTES` for one block of all tracks.
    """
    per = max(1, min(most, -(-total_chunks // (4 * max(slots, 1)))))
    fit = max(1, BLOCK_BYTES // max(1, n_tracks * chunk_bins * itemsize))
    return min(per, fit)


def _codecs(dtype: str) -> list:
    """Written and read once, so speed wins: the output store's codecs
    (:func:`edice_dist.store.fast_codecs`)."""
    from .store import fast_codecs

    return fast_codecs(dtype)


def create(partial: str, chroms_json: list[dict], n_tracks: int, chunk_bins: int,
           per: int, dtype: str) -> None:
    """Create the scratch arrays (no data) with blocks of ``per`` store chunks."""
    import zarr

    root = zarr.open_group(storage.zarr_store(path(partial)), mode="w", zarr_format=3)
    for c in chroms_json:
        root.create_array(c["array"], shape=(n_tracks, c["n_bins"]),
                          chunks=(1, per * chunk_bins), dtype=dtype, fill_value=0,
                          compressors=_codecs(dtype), write_data=False)
    root.attrs.update({"block_chunks": per, "chunk_bins": chunk_bins, "n_tracks": n_tracks})


def stored_block_chunks(partial: str) -> int | None:
    """``per`` of an existing scratch (a resumed ingest keeps its partitions), or None."""
    import json

    meta = storage.join(path(partial), "zarr.json")
    if not storage.exists(meta):
        return None
    return int(json.loads(storage.read_text(meta))["attributes"]["block_chunks"])


def decoded(partial: str) -> set[int]:
    """Columns whose source is completely in the scratch."""
    return {i for key, i in _partial.done_set(path(partial)) if key == DECODED}


def remove(partial: str) -> None:
    storage.remove(path(partial))


def decode_source(partial: str, col: int, read_path: str, shown: str, label: str,
                  chroms_json: list[dict], genome_json: list[dict], bin_size: int,
                  dtype: str) -> tuple[int, str | None]:
    """Decode one source into row ``col`` of every scratch array, then mark it decoded.

    The source is opened once (downloaded once when it is a URL) and read one store chunk
    at a time, so that value errors name the same bin ranges as before and memory holds
    one chunk. Returns (1, None) when done, (0, message) on an input or write error.
    """
    import zarr

    from .genome import Genome
    from .sources import open_source

    genome = Genome.from_json(genome_json, bin_size)
    root = zarr.open_group(storage.zarr_store(path(partial)), mode="r+")
    per = int(root.attrs["block_chunks"])
    chunk_bins = int(root.attrs["chunk_bins"])
    step = per * chunk_bins
    try:
        with open_source(read_path, genome, label, shown=shown) as src:
            for c in chroms_json:
                # Every block is written, all-zero ones too: encode reads the scratch
                # strictly, so a block that is not there is an error, never zeros.
                arr = root[c["array"]].with_config({"write_empty_chunks": True})
                nb = int(c["n_bins"])
                for lo in range(0, nb, step):
                    hi = min(lo + step, nb)
                    row = np.empty(hi - lo, dtype=dtype)
                    for a in range(lo, hi, chunk_bins):
                        b = min(a + chunk_bins, hi)
                        row[a - lo:b - lo] = np.arcsinh(src.binned(c["name"], a, b, bin_size))
                    try:
                        arr[col, lo:hi] = row
                    except OSError as e:
                        return 0, (f"Writing the decoded values of {shown} (track {label}) "
                                   f"to {path(partial)}: {explain(e)}")
    except EdiceError as e:
        return 0, str(e)
    _partial.mark_done(path(partial), DECODED, col)
    return 1, None


def read_block(partial: str, array_key: str, start: int, stop: int) -> np.ndarray:
    """Bins ``[start, stop)`` of every track, shape (n_tracks, stop - start), store dtype.

    Raises
    ------
    InputError
        A scratch chunk is missing (read strictly: never zeros).
    """
    import zarr

    root = zarr.open_group(storage.zarr_store(path(partial), read_only=True, strict=True),
                           mode="r")
    return np.asarray(root[array_key][:, start:stop])
