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


def track_id(cell_key_: str, assay: str) -> str:
    return f"{cell_key_}-{assay}"


def _check_name(value: str, column: str, where: str) -> None:
    if not value:
        raise InputError(f"{where}: the {column} column is empty. Every row needs a {column}.")
    if not _NAME.match(value):
        raise InputError(
            f"{where}: {column} {value!r} has characters other than letters, digits and "
            "_ . + - ( ) [ ]. Names become file names and target lists use ':' , ',' and '@', "
            "so rename it."
        )


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
        _check_name(cell, "cell_type", where)
        _check_name(assay, "assay", where)
        individual = row.get("individual", "")
        if individual:
            _check_name(individual, "individual", where)
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
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        rows = list(csv.DictReader(io.StringIO("\n".join(lines)), delimiter="\t"))
        if not rows or "cell_type" not in rows[0] or "assay" not in rows[0]:
            raise InputError(
                f"Targets file {spec} needs a tab-separated header with cell_type and assay."
            )
        return [(cell_key(r["cell_type"].strip(), (r.get("individual") or "").strip()),
                 r["assay"].strip()) for r in rows]
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
