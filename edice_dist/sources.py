"""Reading source signal files (bigWig, or bedGraph converted once to bigWig) as 25 bp means.

Every stage that reads observed signal (ingest, evaluation) goes through :func:`open_source`
so that bins are computed the same way everywhere:

- a bin's value is the mean of the signal over its bases; bases with no data (gaps between
  intervals, chromosomes absent from the file) count as 0 (SPEC section 3);
- the last bin of a chromosome whose size is not a multiple of the bin size averages over
  its real bases only (``size % bin_size`` of them), not over a padded full bin;
- NaN, infinite or negative stored values are errors that name the file, the track, the
  chromosome and the bin range.

A bedGraph (``chrom start end value``, optionally gzipped) is streamed twice, line by line:
once to validate it (sorted, no overlaps, finite non-negative values, within the chromosome
sizes) and once to write a temporary bigWig; everything downstream then reads bigWig.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import tempfile

import numpy as np
import pyBigWig

from . import BIN_SIZE, storage
from .bigwighead import BIGWIG_MAGIC, _who, check_layout, local_reader, summary_may_hold_nan
from .errors import InputError
from .genome import Genome, _preview

BIGBED_MAGIC = (b"\xeb\xf2\x89\x87", b"\x87\x89\xf2\xeb")  # 0x8789F2EB
GZIP_MAGIC = b"\x1f\x8b"
BEDGRAPH_SUFFIXES = (".bedgraph", ".bg", ".bedgraph.gz", ".bg.gz")
_FLUSH_ENTRIES = 200_000  # bedGraph rows buffered per pyBigWig.addEntries call


def detect_format(local_path: str, shown: str | None = None, label: str | None = None) -> str:
    """``"bigwig"`` or ``"bedgraph"`` from a file's first bytes (not its extension).

    Raises
    ------
    InputError
        For a bigBed, an empty file, or content that is neither format.
    """
    shown = shown or local_path
    with open(local_path, "rb") as f:
        head = f.read(4)
    if head in BIGWIG_MAGIC:
        return "bigwig"
    if head in BIGBED_MAGIC:
        raise InputError(
            f"{_who(shown, label)} is a bigBed (intervals without values), not a bigWig of "
            "-log10 p-values. Give the signal bigWig or a bedGraph instead."
        )
    if not head:
        raise InputError(f"{_who(shown, label)} is empty. Re-create or re-download it.")
    first = _first_data_line(local_path, head.startswith(GZIP_MAGIC))
    if first is not None and _looks_like_bedgraph(first):
        return "bedgraph"
    looks_bw = str(shown).lower().endswith((".bw", ".bigwig"))
    raise InputError(
        f"{_who(shown, label)} is neither a bigWig (its first bytes are {head!r}, a bigWig "
        "starts with 0x888FFC26) nor a bedGraph (tab-separated chrom, start, end, value)."
        + (" The name says bigWig: the file may be truncated or corrupted; download it again."
           if looks_bw else "")
    )


def _open_text(local_path: str, gz: bool):
    if gz:
        return io.TextIOWrapper(gzip.open(local_path, "rb"), encoding="utf-8", errors="replace")
    return open(local_path, encoding="utf-8", errors="replace")


def _is_header(line: str) -> bool:
    return not line.strip() or line.startswith(("#", "track", "browser"))


def _first_data_line(local_path: str, gz: bool) -> str | None:
    try:
        with _open_text(local_path, gz) as f:
            for i, line in enumerate(f):
                if not _is_header(line):
                    return line
                if i > 1000:
                    return None
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    return None


def _looks_like_bedgraph(line: str) -> bool:
    parts = line.split()
    if len(parts) < 4:
        return False
    try:
        int(parts[1]), int(parts[2]), float(parts[3])
    except ValueError:
        return False
    return True


def _bedgraph_rows(local_path: str, gz: bool):
    """Yield (line number, whitespace-split fields) of every data line, unchecked."""
    with _open_text(local_path, gz) as f:
        for lineno, line in enumerate(f, 1):
            if _is_header(line):
                continue
            parts = line.split()
            yield lineno, parts


def _scan_bedgraph(local_path: str, gz: bool, shown: str, label: str | None,
                   genome: Genome | None) -> list[tuple[str, int]]:
    """Validate a bedGraph in one streaming pass.

    Returns
    -------
    list of (chrom, length)
        In file order; the length is the chromosome's size in ``genome`` when it is there,
        else the largest interval end seen.
    """
    who = _who(shown, label)
    order: list[str] = []
    max_end: dict[str, int] = {}
    sizes = genome.size if genome is not None else {}
    chrom, prev_start, prev_end = None, -1, 0
    for lineno, parts in _bedgraph_rows(local_path, gz):
        where = f"{who}, line {lineno}"
        if len(parts) < 4:
            raise InputError(f"{where}: a bedGraph line needs chrom, start, end and value; "
                             f"got {' '.join(parts)!r}.")
        c = parts[0]
        try:
            s, e = int(parts[1]), int(parts[2])
        except ValueError:
            raise InputError(f"{where}: start and end must be integers, got "
                             f"{parts[1]!r} and {parts[2]!r}.") from None
        try:
            v = float(parts[3])
        except ValueError:
            raise InputError(f"{where}: the value {parts[3]!r} is not a number.") from None
        if s < 0 or e <= s:
            raise InputError(f"{where}: the interval {c}:{s}-{e} is empty or negative; "
                             "bedGraph intervals are 0-based, half-open with end > start.")
        if not math.isfinite(v) or v < 0:
            raise InputError(
                f"{where}: {c}:{s}-{e} has the value {parts[3]}. Values must be finite, "
                "non-negative -log10 p-values; fix or drop the interval and re-run."
            )
        if c != chrom:
            if c in max_end:
                raise InputError(
                    f"{where}: {c} appears again after {chrom}; the file is not sorted. "
                    "Sort it with `LC_ALL=C sort -k1,1 -k2,2n` and re-run."
                )
            order.append(c)
            chrom, prev_start, prev_end = c, -1, 0
            max_end[c] = 0
        if s < prev_start:
            raise InputError(f"{where}: {c}:{s}-{e} starts before the previous interval "
                             f"(start {prev_start}); the file is not sorted. Sort it with "
                             "`LC_ALL=C sort -k1,1 -k2,2n` and re-run.")
        if s < prev_end:
            raise InputError(f"{where}: {c}:{s}-{e} overlaps the previous interval, which "
                             f"ends at {prev_end}. A bedGraph gives one value per base: "
                             "merge or remove overlapping intervals.")
        if c in sizes and e > sizes[c]:
            raise InputError(
                f"{where}: {c}:{s}-{e} ends after the end of {c}, which is {sizes[c]:,} bp "
                "in the chromosome sizes file. The file was made for another assembly, or "
                "the chromosome sizes file is wrong."
            )
        prev_start, prev_end = s, e
        max_end[c] = e
    if not order:
        raise InputError(f"{who} is a bedGraph with no data lines.")
    return [(c, sizes.get(c, max_end[c])) for c in order]


def bedgraph_to_bigwig(path: str, out_local: str, genome: Genome | None = None,
                       label: str | None = None, shown: str | None = None) -> dict[str, int]:
    """Validate a local bedGraph (optionally gzipped) and write it as a bigWig.

    Zero-valued intervals are dropped (gaps count as 0 anyway).

    Parameters
    ----------
    path : str
        A local bedGraph file.
    out_local : str
        Where the bigWig goes (written aside, then renamed).
    genome : Genome, optional
        When given, chromosome lengths come from it and intervals past a chromosome's end
        are errors.

    Returns
    -------
    dict
        The chromosome lengths written into the bigWig header.
    """
    shown = shown or path
    with open(path, "rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    header = _scan_bedgraph(path, gz, shown, label, genome)
    tmp = out_local + ".tmp"
    bw = pyBigWig.open(tmp, "w")
    if bw is None:
        raise InputError(f"Cannot write a bigWig at {tmp}.")
    try:
        bw.addHeader(header, maxZooms=0)  # zoom levels are never read here
        buf_c: list[str] = []
        buf_s: list[int] = []
        buf_e: list[int] = []
        buf_v: list[float] = []

        def flush():
            if buf_c:
                bw.addEntries(buf_c, buf_s, ends=buf_e, values=buf_v)
                buf_c.clear(), buf_s.clear(), buf_e.clear(), buf_v.clear()

        for _, parts in _bedgraph_rows(path, gz):
            v = float(parts[3])
            if v == 0.0:
                continue
            buf_c.append(parts[0])
            buf_s.append(int(parts[1]))
            buf_e.append(int(parts[2]))
            buf_v.append(v)
            if len(buf_c) >= _FLUSH_ENTRIES:
                flush()
        flush()
    finally:
        bw.close()
    os.replace(tmp, out_local)
    return dict(header)


class Source:
    """An open bigWig (or converted bedGraph) that yields 25 bp bin means.

    Use :func:`open_source` to make one; close it (or use it as a context manager) to
    release the file and any temporary copy.

    Attributes
    ----------
    path : str
        The file as the user named it (shown in messages).
    label : str
        The track it belongs to (shown in messages), may be empty.
    kind : str
        ``"bigwig"`` or ``"bedgraph"`` (the original format).
    local : str
        The local bigWig actually read.
    """

    def __init__(self, path: str, local: str, kind: str, label: str | None,
                 genome: Genome | None, stack: contextlib.ExitStack):
        self.path, self.local, self.kind = path, local, kind
        self.label = label or ""
        self.genome = genome
        self._stack = stack
        try:
            check_layout(local_reader(local), os.path.getsize(local), _who(path, label))
        except BaseException:
            stack.close()
            raise
        try:
            bw = pyBigWig.open(local)
        except RuntimeError:
            bw = None
        if bw is None or not bw.isBigWig():
            stack.close()
            raise InputError(
                f"{_who(path, label)} cannot be opened as a bigWig (header unreadable). "
                "The file may be truncated or corrupted; download or create it again."
            )
        self._bw = bw
        self._may_hold_nan = summary_may_hold_nan(local_reader(local))
        self._chroms = {str(k): int(v) for k, v in (bw.chroms() or {}).items()}

    # -- context management
    def close(self) -> None:
        if self._bw is not None:
            self._bw.close()
            self._bw = None
        self._stack.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # -- reading
    def chroms(self) -> dict[str, int]:
        """Chromosome lengths in the source's header, in its order."""
        return dict(self._chroms)

    def _chrom_size(self, chrom: str) -> int:
        if self.genome is not None and chrom in self.genome.size:
            return self.genome.size[chrom]
        if chrom in self._chroms:
            return self._chroms[chrom]
        raise ValueError(f"chromosome {chrom} is neither in the genome nor in {self.path}")

    def _fail(self, chrom, start_bin, stop_bin, what, bp) -> None:
        raise InputError(
            f"{_who(self.path, self.label)}: {chrom} bins [{start_bin}, {stop_bin}) hold "
            f"{what} (first at {chrom}:{bp:,}). Values must be finite, non-negative -log10 "
            "p-values: fix the file (e.g. set such values to 0) and re-run."
        )

    def binned(self, chrom: str, start_bin: int, stop_bin: int,
               bin_size: int = BIN_SIZE) -> np.ndarray:
        """Mean signal of bins ``[start_bin, stop_bin)`` of ``chrom``.

        Gaps count as 0; a chromosome the source lacks is all 0. The last bin of a
        chromosome averages over its ``size % bin_size`` real bases when the size is not a
        multiple of ``bin_size``. The chromosome size is the genome's when the source was
        opened with one, else the source header's.

        Returns
        -------
        np.ndarray, shape (stop_bin - start_bin,), float64

        Raises
        ------
        InputError
            On NaN, infinite or negative stored values in the window.
        """
        size = self._chrom_size(chrom)
        nb = -(-size // bin_size)
        if not 0 <= start_bin <= stop_bin <= nb:
            raise ValueError(f"bins [{start_bin}, {stop_bin}) are outside {chrom} (0..{nb})")
        n = stop_bin - start_bin
        out = np.zeros(n, dtype=np.float64)
        if n == 0 or chrom not in self._chroms:
            return out
        lo = start_bin * bin_size
        hi = min(stop_bin * bin_size, size, self._chroms[chrom])
        if hi > lo:
            # values() is a C loop over the file's intervals, 3-5x faster than turning
            # intervals() into tuples. NaN there is a gap or a stored NaN; only the
            # intervals tell them apart, and they are consulted only when the file's
            # total summary (a NaN sum) says that it may hold NaN at all.
            try:
                v = self._bw.values(chrom, lo, hi, numpy=True)
            except RuntimeError as e:
                raise InputError(
                    f"{_who(self.path, self.label)}: reading {chrom} bins [{start_bin}, "
                    f"{stop_bin}) failed ({e}); the file may be truncated or corrupted."
                ) from None
            if v.size == 0:  # a chromosome with no intervals at all (e.g. all-zero input)
                v = np.zeros(hi - lo, dtype=np.float32)
            elif v.size != hi - lo:
                raise InputError(
                    f"{_who(self.path, self.label)}: reading {chrom} bins [{start_bin}, "
                    f"{stop_bin}) returned {v.size} of {hi - lo} bases; the file may be "
                    "corrupted. Create it again."
                )
            low = v.min()  # NaN when any value is NaN
            if np.isnan(low):
                gaps = np.isnan(v)
                if self._may_hold_nan:
                    self._check_stored_nan(chrom, lo, hi, start_bin, stop_bin)
                v[gaps] = 0.0
                low = v.min()
            if low < 0:
                self._fail(chrom, start_bin, stop_bin, "negative values",
                           lo + int(np.argmax(v < 0)))
            if hi - lo < n * bin_size:
                v = np.concatenate([v, np.zeros(n * bin_size - (hi - lo), dtype=v.dtype)])
            # einsum sums each bin in float64 without a float64 copy (2x faster than sum)
            out = np.einsum("ij->i", v.reshape(n, bin_size), dtype=np.float64)
            if np.isinf(out).any():  # every value is >= 0 here, so inf comes from inf
                self._fail(chrom, start_bin, stop_bin, "infinite values",
                           lo + int(np.argmax(np.isinf(v))))
        counts = np.full(n, float(bin_size))
        if stop_bin == nb and size % bin_size:
            counts[-1] = size % bin_size
        return out / counts

    def _check_stored_nan(self, chrom, lo, hi, start_bin, stop_bin) -> None:
        ivs = self._bw.intervals(chrom, lo, hi) or ()
        vals = np.fromiter((t[2] for t in ivs), dtype=np.float64, count=len(ivs))
        nan = np.isnan(vals)
        if nan.any():
            self._fail(chrom, start_bin, stop_bin, "NaN values", max(ivs[int(np.argmax(nan))][0], lo))


def open_source(path: str, genome: Genome | None = None, label: str | None = None,
                shown: str | None = None) -> Source:
    """Open a bigWig or bedGraph (local path or URL) for :meth:`Source.binned` reads.

    Parameters
    ----------
    path : str
        A bigWig (detected by its magic bytes) or a bedGraph (plain or gzipped).
    genome : Genome, optional
        Chromosome sizes: they set the last bin's width and, for a bedGraph, the header
        of the converted bigWig (intervals past a chromosome's end are then errors).
    label : str, optional
        The track the file belongs to, named in error messages.
    shown : str, optional
        The name to use in messages (default ``path``), e.g. the user's file when
        ``path`` is an already converted copy.

    Raises
    ------
    InputError
        Missing, unreadable, empty or corrupted files, bigBeds and invalid bedGraphs.
    """
    shown = shown or str(path)
    who = _who(shown, label)
    stack = contextlib.ExitStack()
    try:
        if not storage.exists(path):
            raise InputError(f"{who} does not exist. Fix the path in the manifest "
                             "(relative paths are relative to the manifest's folder).")
        suffix = ".gz" if str(path).endswith(".gz") else ""
        try:
            local = stack.enter_context(storage.local_copy(path, suffix=suffix))
            kind = detect_format(local, shown, label)
        except PermissionError:
            raise InputError(f"{who} is not readable (permission denied).") from None
        except IsADirectoryError:
            raise InputError(f"{who} is a folder, not a bigWig or bedGraph file.") from None
        if kind == "bedgraph":
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="edice-bg-"))
            out = os.path.join(tmp, "converted.bw")
            bedgraph_to_bigwig(local, out, genome=genome, label=label, shown=shown)
            local = out
        return Source(shown, local, kind, label, genome, stack)
    except BaseException:
        stack.close()
        raise


def _chr_hint(src: list[str], gen: list[str]) -> str:
    def strip(c):
        return c[3:] if c.lower().startswith("chr") else c

    if {strip(c) for c in src} & {strip(c) for c in gen}:
        with_chr = sum(c.lower().startswith("chr") for c in src)
        if with_chr < len(src) / 2:
            return (" The source names lack the 'chr' prefix that the chromosome sizes use "
                    "(e.g. '1' vs 'chr1'): use a chrom.sizes of the same naming, or rename "
                    "the chromosomes in the source.")
        return (" The source names have a 'chr' prefix that the chromosome sizes lack "
                "(e.g. 'chr1' vs '1'): use a chrom.sizes of the same naming, or rename the "
                "chromosomes in the source.")
    return " Check that the source and the chromosome sizes file are for the same assembly."


def check_chroms(source: Source, genome: Genome, label: str | None = None) -> list[str]:
    """Check a source's chromosomes against the genome.

    Genome chromosomes missing from the source read as zeros; source chromosomes not in
    the genome are ignored. Both are fine as long as at least one chromosome matches.

    Returns
    -------
    list[str]
        Warnings (ignored source chromosomes), for the caller to log.

    Raises
    ------
    InputError
        When no chromosome matches (with a 'chr' prefix hint), or a source chromosome is
        longer than the chromosome sizes file says.
    """
    who = _who(source.path, label or source.label)
    src = source.chroms()
    common = [c for c in genome.chroms if c in src]
    if not common:
        raise InputError(
            f"{who} shares no chromosome with the chromosome sizes: the source has "
            f"{_preview(src)}; the chromosome sizes have {_preview(genome.chroms)}."
            + _chr_hint(list(src), list(genome.chroms))
        )
    for c in common:
        if src[c] > genome.size[c]:
            raise InputError(
                f"{who}: {c} is {src[c]:,} bp in the source but {genome.size[c]:,} bp in the "
                "chromosome sizes file. The source was made for another assembly, or the "
                "chromosome sizes file is wrong."
            )
    extra = [c for c in src if c not in genome.size]
    if extra:
        return [f"{who}: ignoring {len(extra)} chromosome(s) not in the chromosome sizes "
                f"({_preview(extra)})."]
    return []
