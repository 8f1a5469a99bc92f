"""The inputs of ``edice evaluate``: the held-out truth tracks, the imputed bigWig of each,
and the genome they are compared over.

- ``truth``: a TSV with the columns ``cell_type assay path`` and optional ``peaks`` (a BED
  of the track's peaks), ``individual`` and ``person_peaks`` (a BED of the track's
  person-specific peaks, :mod:`edice_dist.personpeaks`), as ``edice simulate`` writes to
  ``truth/targets.tsv``; relative paths resolve against its folder.
- ``imputed``: a folder of ``<cell_key>-<assay>.bigWig`` files (an imputation run's
  ``bigwig/``). A ``manifest.tsv`` there (``cell_type assay individual path`` and optional
  ``space``) is used when present.
- The genome: the store's chromosomes when a store is given; else ``chrom_sizes``, else a
  ``chrom.sizes`` beside the truth folder, else the first truth bigWig's header.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from . import runfolder, spaces, storage
from .errors import InputError
from .genome import Genome, read_chrom_sizes
from .tracks import cell_key as make_cell_key
from .tracks import check_distinct_names, check_name
from .tracks import track_id as make_track_id


@dataclass(frozen=True)
class TruthTrack:
    """One held-out track: its bigWig of -log10 p and optional peak BEDs (all its peaks;
    its person-specific peaks)."""

    cell_type: str
    assay: str
    path: str
    peaks: str = ""
    individual: str = ""
    person_peaks: str = ""

    @property
    def cell_key(self) -> str:
        return make_cell_key(self.cell_type, self.individual)

    @property
    def track_id(self) -> str:
        return make_track_id(self.cell_key, self.assay)


def _read_tsv(path: str, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    text = storage.read_input(path, what.lower())
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines)), delimiter="\t"))
    header = [h.strip() for h in (rows[0].keys() if rows else [])]
    missing = [c for c in required if c not in header]
    if not rows or missing:
        raise InputError(
            f"{what} {path} needs a tab-separated header with {', '.join(required)} and one "
            f"row per track" + (f"; it lacks {', '.join(missing)}." if rows else "; it has no rows.")
        )
    return [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in rows]


def _resolve(base: str, p: str) -> str:
    return p if not p or storage.is_url(p) or p.startswith("/") else storage.join(base, p)


def read_truth(path: str) -> list[TruthTrack]:
    """Parse a truth manifest (``cell_type assay path [peaks] [individual] [person_peaks]``).

    Raises
    ------
    InputError
        A missing file or column, an empty path, or a track listed twice.
    """
    rows = _read_tsv(path, ("cell_type", "assay", "path"), "Truth manifest")
    base = storage.parent(path)
    out, seen = [], {}
    for lineno, r in enumerate(rows, 2):
        if not r["cell_type"] or not r["assay"] or not r["path"]:
            raise InputError(f"{path}, line {lineno}: cell_type, assay and path must be filled.")
        check_name(r["cell_type"], "cell_type column", f"{path}, line {lineno}")
        check_name(r["assay"], "assay column", f"{path}, line {lineno}")
        if r.get("individual"):
            check_name(r["individual"], "individual column", f"{path}, line {lineno}")
        t = TruthTrack(r["cell_type"], r["assay"], _resolve(base, r["path"]),
                       _resolve(base, r.get("peaks", "")), r.get("individual", ""),
                       _resolve(base, r.get("person_peaks", "")))
        if (t.cell_key, t.assay) in seen:
            raise InputError(f"{path}, line {lineno}: {t.track_id} is listed twice "
                             f"(first at line {seen[t.cell_key, t.assay]}).")
        seen[t.cell_key, t.assay] = lineno
        out.append(t)
    check_distinct_names([(t.cell_key, t.assay) for t in out], f"Truth manifest {path}")
    return out


def imputed_paths(imputed: str, truth: list[TruthTrack],
                  imputed_space: str = "pval") -> dict[str, tuple[str, str]]:
    """``{track_id: (bigWig path, value space)}`` of the imputed file of every truth track.

    Raises
    ------
    InputError
        Naming the first truth track without an imputed file and the path expected.
    """
    listed: dict[str, tuple[str, str]] = {}
    manifest = storage.join(imputed, runfolder.BIGWIG_MANIFEST)
    if storage.exists(manifest):
        for r in _read_tsv(manifest, ("cell_type", "assay", "path"), "Imputed manifest"):
            tid = make_track_id(make_cell_key(r["cell_type"], r.get("individual", "")), r["assay"])
            listed[tid] = (_resolve(imputed, r["path"]), r.get("space") or imputed_space)
    out = {}
    for t in truth:
        default = storage.join(imputed, runfolder.bigwig_name(t.track_id))
        path, space = listed.get(t.track_id, (default, imputed_space))
        spaces.check(space, f"{manifest}: space of {t.track_id}")
        if not storage.exists(path):
            raise InputError(
                f"No imputed bigWig for truth track {t.track_id} ({t.cell_type} {t.assay}"
                + (f", individual {t.individual}" if t.individual else "")
                + f"): expected {path}. Impute it (`edice impute --targets "
                f"{t.cell_key}:{t.assay}`) or drop it from the truth manifest."
            )
        out[t.track_id] = (path, space)
    return out


def _header(path: str, label: str) -> dict[str, int]:
    """The chromosomes of a truth or imputed file; a bigWig in object storage is read from
    its header bytes (the values are fetched once, by the task that evaluates it)."""
    from .bigwighead import read_header
    from .sources import open_source

    head = read_header(path, label) if storage.is_url(path) else None
    if head is not None:
        return head.chroms()
    with open_source(path, label=label) as src:
        return src.chroms()


def resolve_genome(truth_path: str, truth: list[TruthTrack], store_genome: Genome | None,
                   chrom_sizes: str | None) -> Genome:
    """The evaluation genome (see the module docstring for the order of sources)."""
    if store_genome is not None:
        return store_genome
    if chrom_sizes:
        return read_chrom_sizes(chrom_sizes)
    guess = storage.join(storage.parent(storage.parent(truth_path)), "chrom.sizes")
    if storage.exists(guess):
        return read_chrom_sizes(guess)
    head = _header(truth[0].path, truth[0].track_id)
    return Genome(tuple(head), tuple(head.values()))


def check_header(path: str, label: str, genome: Genome) -> None:
    """Every genome chromosome must be in the bigWig with the same size."""
    head = _header(path, label)
    for c, size in zip(genome.chroms, genome.sizes, strict=True):
        if c not in head:
            raise InputError(
                f"{path} (track {label}) has no chromosome {c}, which the genome has "
                f"({size:,} bp). Evaluate on the same chromosomes as the imputation, e.g. a "
                "store or chrom.sizes restricted to them."
            )
        if head[c] != size:
            raise InputError(
                f"{path} (track {label}): {c} is {head[c]:,} bp there but {size:,} bp in the "
                "genome. The files were made for different assemblies."
            )

