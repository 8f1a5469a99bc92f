"""Chromosome sizes, 25 bp bin arithmetic, chunk plans and BED masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import BIN_SIZE, storage
from .errors import InputError


def n_bins(size: int, bin_size: int = BIN_SIZE) -> int:
    """Number of bins covering a chromosome of ``size`` bp: ``ceil(size / bin_size)``."""
    return math.ceil(size / bin_size)


@dataclass(frozen=True)
class Chunk:
    """One unit of work: bins ``[start, stop)`` of ``chrom``; ``index`` is the chunk's
    position along that chromosome's array (``start // chunk_bins``)."""

    chrom: str
    index: int
    start: int
    stop: int

    @property
    def n_bins(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Genome:
    """Ordered chromosomes and their sizes in bp."""

    chroms: tuple[str, ...]
    sizes: tuple[int, ...]
    bin_size: int = BIN_SIZE

    def __post_init__(self):
        if len(self.chroms) != len(self.sizes):
            raise ValueError("chroms and sizes differ in length")

    @property
    def size(self) -> dict[str, int]:
        return dict(zip(self.chroms, self.sizes, strict=True))

    def n_bins(self, chrom: str) -> int:
        return n_bins(self.size[chrom], self.bin_size)

    @property
    def total_bins(self) -> int:
        return sum(n_bins(s, self.bin_size) for s in self.sizes)

    def subset(self, chroms: list[str] | None) -> Genome:
        """The genome restricted to ``chroms`` (kept in this genome's order)."""
        if not chroms:
            return self
        unknown = [c for c in chroms if c not in self.size]
        if unknown:
            raise InputError(
                f"Chromosome(s) {', '.join(unknown)} are not in the genome "
                f"({_preview(self.chroms)}). Use names from the chrom.sizes file."
            )
        keep = set(chroms)
        pairs = [(c, s) for c, s in zip(self.chroms, self.sizes, strict=True) if c in keep]
        return Genome(tuple(c for c, _ in pairs), tuple(s for _, s in pairs), self.bin_size)

    def chunks(self, chunk_bins: int) -> list[Chunk]:
        """Chunks of ``chunk_bins`` bins over every chromosome, in genome order; the last
        chunk of a chromosome is shorter."""
        out = []
        for chrom in self.chroms:
            nb = self.n_bins(chrom)
            for i, start in enumerate(range(0, nb, chunk_bins)):
                out.append(Chunk(chrom, i, start, min(start + chunk_bins, nb)))
        return out

    def to_json(self) -> list[dict]:
        return [
            {"name": c, "size": s, "n_bins": n_bins(s, self.bin_size)}
            for c, s in zip(self.chroms, self.sizes, strict=True)
        ]

    @classmethod
    def from_json(cls, items: list[dict], bin_size: int = BIN_SIZE) -> Genome:
        return cls(tuple(d["name"] for d in items), tuple(int(d["size"]) for d in items), bin_size)


def _preview(names, k: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def read_chrom_sizes(path: str, chroms: list[str] | None = None) -> Genome:
    """Read a two-column ``chrom.sizes`` file (tab or space separated; ``#`` comments).

    Raises
    ------
    InputError
        When the file is missing, a line is malformed, a size is not a positive integer
        or a chromosome is listed twice.
    """
    text = storage.read_input(path, "chromosome sizes file")
    names, sizes = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise InputError(
                f"{path}, line {lineno}: expected 'chrom<TAB>size', got {line!r}."
            )
        name, size = parts[0], parts[1]
        try:
            size_i = int(size)
        except ValueError:
            size_i = -1
        if size_i <= 0:
            raise InputError(
                f"{path}, line {lineno}: the size of {name} must be a positive integer, got {size!r}."
            )
        if name in names:
            raise InputError(f"{path}, line {lineno}: chromosome {name} is listed twice.")
        names.append(name)
        sizes.append(size_i)
    if not names:
        raise InputError(f"Chromosome sizes file {path} lists no chromosomes.")
    return Genome(tuple(names), tuple(sizes)).subset(chroms)


def write_chrom_sizes(path: str, genome: Genome) -> None:
    text = "".join(f"{c}\t{s}\n" for c, s in zip(genome.chroms, genome.sizes, strict=True))
    storage.write_text_atomic(path, text)


def read_bed(path: str, genome: Genome | None = None) -> dict[str, np.ndarray]:
    """Read a BED file into ``{chrom: int64 array of shape (n, 2)}`` of [start, end) bp,
    sorted by start. Chromosomes outside ``genome`` are dropped; header lines are skipped."""
    text = storage.read_input(path, "BED file")
    per: dict[str, list[tuple[int, int]]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 3:
            raise InputError(f"{path}, line {lineno}: a BED line needs chrom, start and end.")
        try:
            s, e = int(parts[1]), int(parts[2])
        except ValueError:
            raise InputError(f"{path}, line {lineno}: start and end must be integers.") from None
        if e < s or s < 0:
            raise InputError(f"{path}, line {lineno}: end {e} is before start {s}.")
        if genome is not None and parts[0] not in genome.size:
            continue
        per.setdefault(parts[0], []).append((s, e))
    return {c: np.array(sorted(v), dtype=np.int64).reshape(-1, 2) for c, v in per.items()}


def bed_bin_mask(
    intervals: np.ndarray, start_bin: int, stop_bin: int, bin_size: int = BIN_SIZE
) -> np.ndarray:
    """Boolean mask of bins ``[start_bin, stop_bin)`` that overlap any interval by >= 1 bp.

    Parameters
    ----------
    intervals : np.ndarray, shape (n, 2)
        [start, end) in bp.
    """
    n = stop_bin - start_bin
    mask = np.zeros(n, dtype=bool)
    if intervals is None or len(intervals) == 0 or n <= 0:
        return mask
    s = intervals[:, 0] // bin_size - start_bin
    e = (intervals[:, 1] + bin_size - 1) // bin_size - start_bin  # exclusive
    keep = (e > 0) & (s < n) & (intervals[:, 1] > intervals[:, 0])
    s, e = np.clip(s[keep], 0, n), np.clip(e[keep], 0, n)
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, s, 1)
    np.add.at(diff, e, -1)
    mask[:] = np.cumsum(diff[:-1]) > 0
    return mask
