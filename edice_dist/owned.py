"""Output folders the tool owns: the marker, and the check before writing into a folder.

Every stage writes only into a folder that does not exist yet (or is empty), or into
one that holds its own marker for that kind of output: ``.edice.json``, with ``tool``,
``kind`` and ``created``, written first when a stage takes the folder (:func:`claim`).
A folder without the marker, or with another kind's (a model folder given as a run
folder), is refused with or without ``--force``: ``--force`` replaces what the tool
wrote, never a user's files.

Folders written before the marker existed are recognised by their own record
(:data:`RECORDS`) and get the marker when next written.
"""

from __future__ import annotations

import datetime as _dt
import json

from . import __version__, storage
from .errors import InputError

MARKER = ".edice.json"
KINDS = {
    "store": ("track store", "edice ingest"),
    "model": ("model folder", "edice train or edice finetune"),
    "run": ("imputation run folder", "edice impute"),
    "simulation": ("simulation folder", "edice simulate"),
    "evaluation": ("evaluation folder", "edice evaluate"),
    "personal": ("personalised-imputation folder", "edice personal"),
}
"""Kind -> (what it is called, the command that writes it)."""
RECORDS = (
    ("store", "zarr.json", "edice-track-store"),  # store.FORMAT, in the Zarr attributes
    ("store", "_ingest.json", "edice-track-store"),  # an unfinished ingest (ingest.py)
    ("model", "model.json", "edice-model"),  # checkpoint.FORMAT
    ("model", "train.json", None),  # a model folder whose training has not finished
    ("run", "run.json", "edice-imputation-run"),  # runfolder.RUN_FORMAT
    ("simulation", "simulation.json", "edice-simulation"),  # simulate.SIM_FORMAT
    ("personal", "personal.json", "edice-personal"),  # personal.FORMAT
    ("evaluation", "metrics.json", "edice-dist"),  # its "tool"
)
"""(kind, record file, the ``format`` or ``tool`` in it; None: any): how an output is
recognised by its own record, which a store always has (a marker file in a Zarr store
would make zarr warn whenever the store is listed), and which outputs made before the
marker existed have. (The formats are written here rather than imported, so that this
check does not import torch or zarr.)"""
SELF_MARKED = frozenset({"store"})
"""Kinds that :func:`claim` gives no marker file: their record is written first."""


def _read(path: str) -> dict | None:
    try:
        doc = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def kind_of(folder: str) -> str | None:
    """The kind of output ``folder`` holds by its marker (or its record); None when it
    holds none (or does not exist)."""
    marker = _read(storage.join(folder, MARKER))
    if marker is not None and marker.get("tool") == "edice-dist":
        return str(marker.get("kind"))
    for kind, name, fmt in RECORDS:
        path = storage.join(folder, name)
        if not storage.exists(path):
            continue
        doc = _read(path)
        if fmt is None or doc is not None and fmt in (
                doc.get("format"), doc.get("tool"), (doc.get("attributes") or {}).get("format")):
            return kind
    return None


def check(folder: str, kind: str, flag: str = "--out", empty_ok: bool = True) -> bool:
    """May a stage that writes ``kind`` write into ``folder``? Nothing is written.

    Parameters
    ----------
    empty_ok : an existing empty folder counts as new (without it, it is refused).

    Returns
    -------
    bool
        True when ``folder`` holds output of this kind (the stage resumes or replaces
        it), False when it does not exist (or is empty).

    Raises
    ------
    InputError
        ``folder`` holds other files, or another kind of output; ``flag`` names the
        option to change.
    """
    names = storage.list_dir(folder)
    if not names:
        if storage.exists(folder) and not _is_folder(folder):
            raise InputError(f"{flag} {folder} is a file, not a folder. Choose a new folder.")
        if empty_ok or not storage.exists(folder):
            return False
    found = kind_of(folder)
    what, command = KINDS[kind]
    if found == kind:
        return True
    if found is not None:
        raise InputError(
            f"{flag} {folder} is an edice {KINDS[found][0]}, not {_a(what)}. Choose a new "
            f"folder for the {what} (or the {what} that {command} wrote before)."
        )
    if not names:
        raise InputError(f"{flag} {folder} exists and is not {_a(what)} (no {MARKER} "
                         "marker). Choose a new folder.")
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise InputError(
        f"{flag} {folder} is not {_a(what)}: it holds files that edice did not write ({shown}; "
        f"no {MARKER} marker), and edice replaces nothing there, not even with --force. "
        "Choose a new or empty folder."
    )


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _is_folder(path: str) -> bool:
    fs, p = storage.filesystem(path)
    return fs.isdir(p)


def claim(folder: str, kind: str, flag: str = "--out") -> None:
    """Take ``folder`` for output of ``kind``: :func:`check`, create it and write the
    marker (kept when already there). Call it before the first write into ``folder``."""
    check(folder, kind, flag)
    marker = storage.join(folder, MARKER)
    storage.makedirs(folder)
    if kind in SELF_MARKED or storage.exists(marker):
        return
    storage.write_text_atomic(marker, json.dumps({
        "tool": "edice-dist", "kind": kind, "tool_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}) + "\n")


def foreign(folder: str, written: set[str] | frozenset[str]) -> list[str]:
    """Names in ``folder`` that are not among those its stage writes (``written``; the
    marker always counts as written)."""
    return [n for n in storage.list_dir(folder) if n not in written and n != MARKER]


def check_replace(folder: str, written: set[str] | frozenset[str], flag: str = "--out") -> None:
    """Before ``--force`` replaces an owned ``folder`` as a whole: refuse when it also
    holds files its stage does not write (a user's own), naming them."""
    extra = foreign(folder, written)
    if extra:
        raise InputError(
            f"{flag} {folder} also holds files that edice did not write "
            f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); --force replaces "
            "only what edice wrote. Move them elsewhere, or choose a new folder."
        )
