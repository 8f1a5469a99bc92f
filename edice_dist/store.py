"""The Zarr v3 track store: one (bins x tracks) array per chromosome.

Layout and attributes are described in ARCHITECTURE.md. Values are
arcsinh(-log10 p) in 25 bp bins; the store is written by :mod:`edice_dist.ingest`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import zarr

from . import BIN_SIZE, __version__, storage
from ._partial import partial_path
from .errors import EdiceError, InputError
from .genome import Chunk, Genome
from .tracks import Track, check_name, check_vocabulary

FORMAT = "edice-track-store"
FORMAT_VERSION = 2
"""2: chunks are shards of ``block_bins``-bin inner chunks (1: plain chunks; still read)."""
DEFAULT_CHUNK_BINS = 16384
"""Bins per chunk (all tracks in one chunk): the unit that one writer owns and that
imputation reads. Whole-chunk reads run at millions of bins/s from 16384 bins up (4096 was
~1.5-2x slower); larger chunks cost memory in every reader (a 1,000-track chunk decodes to
~66 MB as float32 at 16384 bins, ~265 MB at 65536) (BENCHMARKS.md, Ingest)."""
DEFAULT_BLOCK_BINS = 1024
"""Bins per inner chunk of a chunk (Zarr sharding): the unit that the training sampler
reads at random genome-wide. One file per chunk still, but a 1024-bin block is read
without decoding the other 15 (BENCHMARKS.md, Training sampler)."""
DEFAULT_DTYPE = "float16"
"""Half the size of float32; its error in arcsinh space (max ~4e-3, mean ~9e-5 on
simulated tracks) is far below the model's error (MSE ~0.1)."""
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def array_key(chrom: str, index: int) -> str:
    """A Zarr-safe array name for a chromosome (odd contig names get ``chrom_<i>``)."""
    return chrom if _KEY.match(chrom) and not chrom.startswith(".") else f"chrom_{index:05d}"


def default_codecs(dtype: str = DEFAULT_DTYPE) -> list:
    """Compressors chosen by ``benchmarks/bench_ingest.py`` (see BENCHMARKS.md, Ingest).

    Blosc zstd-3 with bit shuffling: as small as any shuffled encoding (1.81 bytes per
    float16 value on simulated tracks; lz4 with bit shuffling ties) and fast to decode
    (several 1e8 values/s per core), which matters because training and imputation decode
    every chunk they use. Unshuffled zstd was ~19 % smaller on the simulator's quantised
    values but decoded 4-9x slower.

    A CRC32C checksum follows (4 bytes a chunk): blosc decodes a damaged chunk into
    garbage values without an error; the checksum makes it an error naming the chunk.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle",
                       typesize=np.dtype(dtype).itemsize), Crc32cCodec()]


def fast_codecs(dtype: str = DEFAULT_DTYPE) -> list:
    """Compressors for arrays written once per run at the rate of the computation (the
    imputed output, ingest's scratch): blosc lz4 with bit shuffling, then a CRC32C
    checksum (see :func:`default_codecs`).

    Chosen by ``benchmarks/bench_output_codec.py`` at 2,000 targets (BENCHMARKS.md,
    Imputation, output codec): 1.67 bytes per float16 prediction against 2.00
    uncompressed and 1.65 for zstd-3, and ~3x zstd-3's write rate, which matters because
    one GPU's imputation writes tens of millions of values per second.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle",
                       typesize=np.dtype(dtype).itemsize), Crc32cCodec()]


def create(
    path: str,
    genome: Genome,
    tracks: list[Track],
    chunk_bins: int = DEFAULT_CHUNK_BINS,
    dtype: str = DEFAULT_DTYPE,
    compressors: list | None = None,
    extra_attrs: dict | None = None,
    overwrite: bool = True,
    block_bins: int = DEFAULT_BLOCK_BINS,
) -> zarr.Group:
    """Create an empty store at ``path`` (normally a ``.partial`` folder): every array and
    all root attributes. Workers then fill whole chunks.

    Each chunk of ``chunk_bins`` bins is a Zarr shard of inner chunks of ``block_bins``
    bins, so that a block can be read on its own (when ``chunk_bins`` is not a multiple of
    ``block_bins``, a block is a whole chunk).

    With ``overwrite`` (the default) anything at ``path`` is deleted first; without it,
    files that are not Zarr nodes (e.g. a writer's bookkeeping) are kept."""
    if chunk_bins <= 0 or block_bins <= 0:
        raise ValueError("chunk_bins and block_bins must be positive")
    if chunk_bins % block_bins:  # shards must align with the writers' chunks
        block_bins = chunk_bins
    compressors = compressors if compressors is not None else default_codecs(dtype)
    root = zarr.open_group(storage.zarr_store(path), mode="w" if overwrite else "a",
                           zarr_format=3)
    chroms = genome.to_json()
    for i, c in enumerate(chroms):
        c["array"] = array_key(c["name"], i)
    grp = root.create_group("signal")
    for c in chroms:
        shard = min(chunk_bins, max(c["n_bins"], 1))
        inner = min(block_bins, shard)
        # A shard must hold whole inner chunks: a short chromosome's only shard is
        # rounded up to a multiple of the inner chunk (the array's edge clips it).
        grp.create_array(
            c["array"],
            shape=(c["n_bins"], len(tracks)),
            chunks=(inner, len(tracks)),
            shards=(-(-shard // inner) * inner, len(tracks)),
            dtype=dtype,
            compressors=compressors,
            fill_value=0,
            dimension_names=("bin", "track"),
            write_data=False,
        )
    cell_keys = sorted({t.cell_key for t in tracks})
    assays = sorted({t.assay for t in tracks})
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": "edice-dist",
        "tool_version": __version__,
        "bin_size": genome.bin_size,
        "transform": "arcsinh",
        "value_space": "arcsinh(-log10 p), 25 bp means of the source signal; gaps count as 0",
        "dtype": dtype,
        "codec": json.loads(json.dumps([c.to_dict() for c in compressors])),
        "chunk_bins": chunk_bins,
        "block_bins": block_bins,
        "chroms": chroms,
        "tracks": [t.to_json() for t in tracks],
        "cell_keys": cell_keys,
        "assays": assays,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    attrs.update(extra_attrs or {})
    root.attrs.update(attrs)
    return root


@dataclass
class TrackStore:
    """A read handle on a complete store.

    Attributes
    ----------
    path : str
    attrs : dict
        The root attributes.
    genome : Genome
    tracks : list[Track]
        In column order of every signal array.
    """

    path: str
    attrs: dict
    genome: Genome
    tracks: list[Track]
    _group: zarr.Group

    @property
    def chunk_bins(self) -> int:
        return int(self.attrs["chunk_bins"])

    @property
    def block_bins(self) -> int:
        """Bins of one cheap random read (the inner chunk; a format-1 store has none, and
        its blocks decode a whole chunk each: re-ingest it for faster training)."""
        return int(self.attrs.get("block_bins", min(DEFAULT_BLOCK_BINS, self.chunk_bins)))

    @property
    def n_tracks(self) -> int:
        return len(self.tracks)

    @property
    def cell_keys(self) -> list[str]:
        return list(self.attrs["cell_keys"])

    @property
    def assays(self) -> list[str]:
        return list(self.attrs["assays"])

    @property
    def transform(self) -> str:
        return self.attrs["transform"]

    def track_ids(self) -> list[str]:
        return [t.track_id for t in self.tracks]

    def identity(self) -> dict:
        """What identifies this store's data, for provenance and to notice a changed store.

        Returns
        -------
        dict
            ``path``, ``tracks`` (``track_id:split`` in column order), ``chroms``
            (``[name, n_bins]``), ``transform`` and ``bin_size``: readable, and equal for two
            ingests of the same tracks; and ``sha256``, a digest of every root attribute,
            which also changes when the store is ingested again (it records when).
        """
        digest = hashlib.sha256(json.dumps(self.attrs, sort_keys=True, default=str).encode())
        return {
            "path": self.path,
            "tracks": [f"{t.track_id}:{t.split}" for t in self.tracks],
            "chroms": [[c["name"], c["n_bins"]] for c in self.attrs["chroms"]],
            "transform": self.transform,
            "bin_size": self.genome.bin_size,
            "sha256": digest.hexdigest(),
        }

    def split_indices(self, *splits: str) -> np.ndarray:
        """Column indices of the tracks in ``splits``."""
        return np.array([i for i, t in enumerate(self.tracks) if t.split in splits], dtype=np.int64)

    def array_key(self, chrom: str) -> str:
        for c in self.attrs["chroms"]:
            if c["name"] == chrom:
                return c["array"]
        raise InputError(
            f"Chromosome {chrom} is not in store {self.path} (it has "
            f"{', '.join(self.genome.chroms[:5])}{', ...' if len(self.genome.chroms) > 5 else ''})."
        )

    def array(self, chrom: str) -> zarr.Array:
        return self._group["signal"][self.array_key(chrom)]

    def read(self, chrom: str, start: int, stop: int, columns=None,
             dtype=np.float32) -> np.ndarray:
        """Observed values of bins ``[start, stop)`` of ``chrom``.

        Parameters
        ----------
        columns : array-like of int, optional
            Track columns to return (all when None).
        dtype : the result's dtype; None keeps the store's own (float16 halves the memory
            of a reader that holds many bins, such as the training sampler).

        Returns
        -------
        np.ndarray, shape (stop - start, n_columns)
            arcsinh(-log10 p); windows may span chunk boundaries.
        """
        nb = self.genome.n_bins(chrom)
        if not 0 <= start <= stop <= nb:
            raise ValueError(f"window [{start}, {stop}) is outside {chrom} (0..{nb} bins)")
        arr = self.array(chrom)
        try:
            data = arr[start:stop]
        except InputError as e:  # a missing chunk file (the store is opened strictly)
            raise InputError(f"Store {self.path}, {chrom} bins {start}-{stop}: {e}") from None
        except Exception as e:  # zarr and its codecs raise many types for damaged data
            first = start // arr.metadata.chunk_grid.chunk_shape[0]
            key = storage.join(self.path, "signal", self.array_key(chrom),
                               arr.metadata.encode_chunk_key((first, 0)))
            raise InputError(
                f"Store {self.path} cannot be read at {chrom} bins {start}-{stop} (chunk "
                f"file {key}{' and the next' if stop - start > self.chunk_bins else ''}): "
                f"{type(e).__name__}: {str(e).rstrip('.')}. The store is damaged; rebuild it "
                "with `edice ingest --force`."
            ) from e
        if columns is not None:
            data = data[:, np.asarray(columns)]
        return np.asarray(data, dtype=dtype)

    def chunks(self, chroms: list[str] | None = None) -> list[Chunk]:
        """The store's chunk grid over ``chroms`` (all by default), in genome order."""
        return self.genome.subset(chroms).chunks(self.chunk_bins)

    def nbytes_on_disk(self) -> int:
        fs, p = storage.filesystem(self.path)
        return int(fs.du(p, total=True))


def open_store(path: str) -> TrackStore:
    """Open a complete track store.

    Raises
    ------
    InputError
        When nothing is at ``path``, it is not a track store, its format version is
        newer than this tool's, or only an unfinished ``.partial`` store exists.
    """
    if not storage.exists(storage.join(path, "zarr.json")):
        hint = ""
        if storage.exists(partial_path(path)):
            hint = (f" An unfinished ingest is at {partial_path(path)}: re-run `edice ingest` "
                    "with the same arguments to complete it.")
        raise InputError(f"No track store at {path}.{hint} Build one with `edice ingest`.")
    try:
        group = zarr.open_group(storage.zarr_store(path, read_only=True, strict=True), mode="r")
    except Exception as e:  # zarr raises several types for unreadable metadata
        raise InputError(f"{path} is not a readable Zarr store: {e}.") from None
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise InputError(
            f"{path} is a Zarr group but not an edice track store (format is "
            f"{attrs.get('format')!r}, expected {FORMAT!r})."
        )
    if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(
            f"Store {path} has format version {attrs['format_version']}; this edice-dist "
            f"({__version__}) reads up to {FORMAT_VERSION}. Upgrade edice-dist."
        )
    if not attrs.get(FINALISED):
        raise InputError(
            f"{path} is an unfinished track store: `edice ingest` has not finalised it (an "
            "interrupted ingest's .partial folder, a store written by an earlier edice-dist "
            "or by another tool), so chunks may be missing. Re-run the same `edice ingest` "
            "command to finish it (with --force for a store of an earlier edice-dist), and "
            "use the store it renames into place."
        )
    genome = Genome.from_json(attrs["chroms"], int(attrs.get("bin_size", BIN_SIZE)))
    tracks = [Track.from_json(t) for t in attrs["tracks"]]
    check_names(tracks, f"Store {path}")
    return TrackStore(path, attrs, genome, tracks, group)


FINALISED = "finalised"
"""Root attribute of a finished store: when it was finalised and its chunks per array."""


def check_names(tracks: list[Track], where: str) -> None:
    """The name rule (:func:`edice_dist.tracks.check_name`) for tracks read from a file."""
    for t in tracks:
        check_name(t.cell_type, "cell type", where)
        check_name(t.assay, "assay", where)
        if t.individual:
            check_name(t.individual, "individual", where)
    check_vocabulary(sorted({t.cell_key for t in tracks}), sorted({t.assay for t in tracks}),
                     where)


def _chunk_keys(arr: zarr.Array, prefix: str) -> list[str]:
    """The key of every stored chunk (every shard when sharded) of ``arr``."""
    import itertools

    grid = [-(-n // c) for n, c in zip(arr.shape, arr.metadata.chunk_grid.chunk_shape,
                                        strict=True)]
    return [f"{prefix}/{arr.metadata.encode_chunk_key(ix)}"
            for ix in itertools.product(*(range(g) for g in grid))]


def mark_complete(path: str) -> dict:
    """Finalise the store at ``path``: check that every chunk file exists, then record
    :data:`FINALISED` (only stores with it open). Writers must write every chunk, empty
    ones included (zarr skips chunks of fill values unless told not to).

    Returns
    -------
    dict
        Chunks per array key.

    Raises
    ------
    EdiceError
        Naming the chunk files that are missing.
    """
    import datetime as _dt

    group = zarr.open_group(storage.zarr_store(path), mode="r+")
    fs, inner = storage.filesystem(path)
    base = inner.rstrip("/") + "/"
    have = {f[len(base):] for f in fs.find(inner)}
    counts, missing = {}, []
    for c in group.attrs["chroms"]:
        keys = _chunk_keys(group["signal"][c["array"]], f"signal/{c['array']}")
        counts[c["array"]] = len(keys)
        missing += [k for k in keys if k not in have]
    if missing:
        raise EdiceError(
            f"Store {path} lacks {len(missing)} chunk file(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}), so it was not finalised. Run the same "
            "command again to write them."
        )
    group.attrs[FINALISED] = {"at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                              "chunks": counts}
    return counts


def presence_matrix(tracks: list[Track]) -> tuple[list[str], list[str], np.ndarray]:
    """(cell_keys, assays, matrix of split letters or '.') for display."""
    cells = sorted({t.cell_key for t in tracks})
    assays = sorted({t.assay for t in tracks})
    m = np.full((len(cells), len(assays)), ".", dtype=object)
    for t in tracks:
        m[cells.index(t.cell_key), assays.index(t.assay)] = {"train": "x", "val": "v", "test": "t"}[t.split]
    return cells, assays, m


def codec_summary(codecs: list[dict]) -> str:
    """``blosc zstd-3 bitshuffle`` style names of a store's ``codec`` attribute."""
    names = []
    for c in codecs or []:
        cfg = c.get("configuration", {})
        if c.get("name") == "blosc":
            names.append(f"blosc {cfg.get('cname')}-{cfg.get('clevel')} {cfg.get('shuffle')}")
        else:
            level = cfg.get("level")
            names.append(c.get("name", "?") + (f"-{level}" if level is not None else ""))
    return " + ".join(names) or "uncompressed"


def describe(path: str) -> str:
    """What ``edice info STORE`` prints."""
    s = open_store(path)
    lines = [
        f"track store  {path}",
        f"format       {s.attrs['format']} v{s.attrs['format_version']} "
        f"(written by edice-dist {s.attrs.get('tool_version')}, {s.attrs.get('created')})",
        f"values       {s.attrs.get('value_space')}",
        f"encoding     {s.attrs['dtype']}, {codec_summary(s.attrs.get('codec'))}, "
        f"chunks of {s.chunk_bins} bins x {s.n_tracks} tracks",
        f"genome       {len(s.genome.chroms)} chromosomes, {s.genome.total_bins:,} bins of "
        f"{s.genome.bin_size} bp ({sum(s.genome.sizes):,} bp)",
    ]
    for c in s.attrs["chroms"][:25]:
        lines.append(f"  {c['name']:<14} {c['size']:>13,} bp {c['n_bins']:>12,} bins")
    if len(s.attrs["chroms"]) > 25:
        lines.append(f"  ... {len(s.attrs['chroms']) - 25} more")
    counts = {sp: sum(t.split == sp for t in s.tracks) for sp in ("train", "val", "test")}
    lines.append(
        f"tracks       {s.n_tracks} ({counts['train']} train, {counts['val']} val, "
        f"{counts['test']} test); {len(s.cell_keys)} cell types x {len(s.assays)} assays"
    )
    cells, assays, m = presence_matrix(s.tracks)
    width = max(len(c) for c in cells)
    lines.append("presence     x = train, v = val, t = test, . = not observed")
    lines.append(" " * (width + 2) + " ".join(f"{a[:8]:>8}" for a in assays))
    for i, c in enumerate(cells):
        lines.append(f"  {c:<{width}}" + " ".join(f"{v:>8}" for v in m[i]))
    nbytes = s.nbytes_on_disk()
    cells_total = s.genome.total_bins * s.n_tracks
    lines.append(
        f"size on disk {nbytes / 2**20:,.1f} MiB ({nbytes / max(cells_total, 1):.3f} bytes per bin x track)"
    )
    return "\n".join(lines)
