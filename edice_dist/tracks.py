"""The manifest (SPEC section 3): one row per observed track.

Columns ``cell_type``, ``assay``, ``path`` are required; ``split`` (train/val/test, default
train) and ``individual`` are optional. Relative paths resolve against the manifest's folder.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass

from . import storage
from .errors import InputError

REQUIRED = ("cell_type", "assay", "path")
SPLITS = ("train", "val", "test")
_NAME = re.compile(r"^[A-Za-z0-9_.+()\[\]-]+$")


@dataclass(frozen=True)
class Track:
    """One observed (cell type, assay) track of one individual."""

    cell_type: str
    assay: str
    path: str = ""
    split: str = "train"
    individual: str = ""

    @property
    def cell_key(self) -> str:
        """The model's cell node: the cell type, or ``cell_type@individual``."""
        return cell_key(self.cell_type, self.individual)

    @property
    def track_id(self) -> str:
        """``<cell_key>-<assay>``: also the output bigWig's file stem."""
        return track_id(self.cell_key, self.assay)

    def to_json(self) -> dict:
        d = asdict(self)
        d["source"] = d.pop("path")
        d["cell_key"] = self.cell_key
        d["track_id"] = self.track_id
        return d

    @classmethod
    def from_json(cls, d: dict) -> Track:
        return cls(d["cell_type"], d["assay"], d.get("source", d.get("path", "")),
                   d.get("split", "train"), d.get("individual", ""))


def cell_key(cell_type: str, individual: str = "") -> str:
    return f"{cell_type}@{individual}" if individual else cell_type


def split_cell_key(key: str) -> tuple[str, str]:
    """``cell_type@individual`` -> (cell_type, individual); plain cell types -> (key, '')."""
    cell, _, ind = key.partition("@")
    return cell, ind


def individuals_of(cell_keys) -> tuple[str, ...]:
    """Each cell key's individual ('' for none); () when no key names one."""
    inds = tuple(split_cell_key(c)[1] for c in cell_keys)
    return inds if any(inds) else ()


def track_id(cell_key_: str, assay: str) -> str:
    return f"{cell_key_}-{assay}"


NAME_CHARS = "letters, digits and _ . + - ( ) [ ]"
MAX_NAME = 80
"""Longest cell type, assay or individual name: ``.<cell>@<individual>-<assay>.bigWig.tmp``
then stays within the 255 bytes a file name may have."""


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a cell type, assay or individual name; None when it can.

    The one rule for every name that becomes part of a path, wherever it was read (a
    manifest, a targets file, a store's attributes, a model's metadata, a run's
    ``run.json``): names become file names (``<cell_type>-<assay>.bigWig``), and target
    lists use ``:``, ``,`` and ``@``, so only :data:`NAME_CHARS` are allowed, not a
    leading ``.`` (``.``, ``..`` and hidden files), at most :data:`MAX_NAME` characters.
    """
    if not isinstance(value, str) or not value:
        return "is empty"
    if len(value) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if not _NAME.match(value):
        return f"has characters other than {NAME_CHARS}"
    if value.startswith("."):
        return "starts with '.'"
    return None


def check_name(value: str, what: str, where: str) -> None:
    """Raise an InputError naming ``where`` when ``value`` breaks :func:`name_problem`."""
    problem = name_problem(value)
    if problem == "is empty":
        raise InputError(f"{where}: the {what} is empty; every track needs one.")
    if problem:
        raise InputError(
            f"{where}: {what} {value!r} {problem}. Names become file names and target lists "
            "use ':' , ',' and '@', so rename it."
        )


def check_cell_key(key: str, where: str) -> None:
    """Check a model cell (``cell_type`` or ``cell_type@individual``) with the name rule."""
    cell, ind = split_cell_key(key)
    check_name(cell, "cell type", where)
    if "@" in key:
        check_name(ind, "individual", where)


def check_distinct_names(pairs, where: str) -> None:
    """Refuse (cell_key, assay) pairs of which two different ones share a track id.

    Names may contain ``-`` (``IMR-90``, ``DNase-seq``) and the track id (SPEC 3's bigWig
    name ``<cell_type>-<assay>``) joins them with ``-``, so ``A-B`` x ``C`` and ``A`` x
    ``B-C`` would both be ``A-B-C.bigWig``, one file for two tracks.

    Parameters
    ----------
    pairs : iterable of (cell_key, assay); e.g. a whole vocabulary's cross product, so
        that any target a model may be asked for has a file name of its own.
    """
    seen: dict[str, tuple[str, str]] = {}
    for c, a in pairs:
        tid = track_id(c, a)
        other = seen.setdefault(tid, (c, a))
        if other != (c, a):
            raise InputError(
                f"{where}: the pairs {other[0]} x {other[1]} and {c} x {a} would both be named "
                f"{tid} (bigWig {tid}.bigWig), because names contain '-'. Rename a cell type "
                "or an assay (e.g. replace '-' by '_' in it) so that every pair has a name "
                "of its own."
            )


def check_vocabulary(cell_keys, assays, where: str) -> None:
    """Check a vocabulary: every name by the name rule, and no two of its (cell, assay)
    pairs sharing a file name (:func:`check_distinct_names`)."""
    for c in cell_keys:
        check_cell_key(c, where)
    for a in assays:
        check_name(a, "assay", where)
    check_distinct_names(((c, a) for c in cell_keys for a in assays), where)


def read_manifest(path: str) -> list[Track]:
    """Parse and validate a manifest TSV.

    Returns
    -------
    list[Track]
        In file order, with ``path`` resolved to an absolute path or URL.

    Raises
    ------
    InputError
        Missing file, missing columns, no rows, bad names, bad split values or
        duplicate (individual, cell type, assay) rows; the message names the line.
    """
    text = storage.read_input(path, "manifest")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise InputError(
            f"Manifest {path} is empty. It needs a header row with the columns "
            f"{', '.join(REQUIRED)} and one row per track."
        )
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter="\t")
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(
            f"Manifest {path} lacks the column(s) {', '.join(missing)}; its header is "
            f"{header!r}. The header must be tab-separated and include {', '.join(REQUIRED)} "
            "(optional: split, individual)."
        )
    base = storage.parent(path)
    tracks: list[Track] = []
    seen: dict[tuple[str, str, str], int] = {}
    for lineno, row in enumerate(reader, 2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        where = f"{path}, line {lineno}"
        cell, assay, src = row["cell_type"], row["assay"], row["path"]
        check_name(cell, "cell_type column", where)
        check_name(assay, "assay column", where)
        individual = row.get("individual", "")
        if individual:
            check_name(individual, "individual column", where)
        split = row.get("split", "") or "train"
        if split not in SPLITS:
            raise InputError(f"{where}: split {split!r} must be one of {', '.join(SPLITS)}.")
        if not src:
            raise InputError(f"{where}: the path column is empty for {cell} {assay}.")
        if not storage.is_url(src) and not src.startswith("/"):
            src = storage.join(base, src)
        key = (individual, cell, assay)
        if key in seen:
            who = f"{cell} {assay}" + (f" of individual {individual}" if individual else "")
            raise InputError(
                f"{where}: {who} is listed twice (first at line {seen[key]}). Keep one row "
                "per (cell type, assay), or merge the replicates into one bigWig first."
            )
        seen[key] = lineno
        tracks.append(Track(cell, assay, src, split, individual))
    if not tracks:
        raise InputError(f"Manifest {path} has a header but no tracks.")
    check_vocabulary(sorted({t.cell_key for t in tracks}), sorted({t.assay for t in tracks}),
                     f"Manifest {path}")
    return tracks


def write_manifest(path: str, tracks: list[Track], relative_to: str | None = None) -> None:
    """Write a manifest TSV; paths under ``relative_to`` are written relative to it."""
    has_ind = any(t.individual for t in tracks)
    cols = ["cell_type", "assay", "path", "split"] + (["individual"] if has_ind else [])
    lines = ["\t".join(cols)]
    for t in tracks:
        p = t.path
        if relative_to and not storage.is_url(p) and p.startswith(relative_to.rstrip("/") + "/"):
            p = p[len(relative_to.rstrip("/")) + 1 :]
        vals = [t.cell_type, t.assay, p, t.split] + ([t.individual] if has_ind else [])
        lines.append("\t".join(vals))
    storage.write_text_atomic(path, "\n".join(lines) + "\n")


def parse_targets(spec: str) -> list[tuple[str, str]]:
    """``--targets``: a TSV with columns ``cell_type``, ``assay`` (and optional
    ``individual``), or a list ``cell:assay,cell:assay``. Returns (cell_key, assay) pairs."""
    if storage.is_url(spec) or "\t" in spec or spec.endswith((".tsv", ".txt")) or (
        ":" not in spec and storage.exists(spec)
    ):
        text = storage.read_input(spec, "targets file")
        kept = [(i, ln) for i, ln in enumerate(text.splitlines(), 1)
                if ln.strip() and not ln.startswith("#")]
        rows = list(csv.DictReader(io.StringIO("\n".join(ln for _, ln in kept)), delimiter="\t"))
        if not rows or "cell_type" not in rows[0] or "assay" not in rows[0]:
            raise InputError(
                f"Targets file {spec} needs a tab-separated header with cell_type and assay."
            )
        pairs = []
        for (lineno, line), r in zip(kept[1:], rows, strict=False):
            cell, assay = (r.get("cell_type") or "").strip(), (r.get("assay") or "").strip()
            if not cell or not assay:
                raise InputError(
                    f"Targets file {spec}, line {lineno}: {line.strip()!r} lacks "
                    f"{'a cell_type' if not cell else 'an assay'}. Every row needs a cell type and "
                    "an assay, separated by a tab, under the header's columns."
                )
            pairs.append((cell_key(cell, (r.get("individual") or "").strip()), assay))
        return pairs
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item.count(":") != 1:
            raise InputError(
                f"Target {item!r} is not of the form cell_type:assay (a list is "
                "cell:assay,cell:assay; or give a TSV file with cell_type and assay columns)."
            )
        c, a = (x.strip() for x in item.split(":"))
        out.append((c, a))
    if not out:
        raise InputError("The target list is empty.")
    return out
