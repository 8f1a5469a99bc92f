"""Done markers of multi-writer outputs, and write-aside-then-rename for track stores.

Writers own whole chunks; each writes a done marker after its chunk's data. A track
store is written at ``<path>.partial``: finalise checks every marker, drops them and
renames it to ``<path>``. The imputation output is written in place instead (a rename on
an object store copies every object) and completed by a record
(:func:`edice_dist.runfolder.mark_complete`).
"""

from __future__ import annotations

from . import storage
from .errors import EdiceError

SUFFIX = ".partial"
DONE = "_done"


def partial_path(path: str) -> str:
    return str(path).rstrip("/") + SUFFIX


def marker_path(root: str, array_key: str, index: int) -> str:
    return storage.join(root, DONE, array_key, f"{index:07d}")


def mark_done(root: str, array_key: str, index: int) -> None:
    storage.write_text_atomic(marker_path(root, array_key, index), "done\n")


def is_done(root: str, array_key: str, index: int) -> bool:
    return storage.exists(marker_path(root, array_key, index))


def done_set(root: str) -> set[tuple[str, int]]:
    """Every (array_key, chunk index) whose marker exists under ``root``."""
    out = set()
    for key in storage.list_dir(storage.join(root, DONE)):
        for name in storage.list_dir(storage.join(root, DONE, key)):
            if name.isdigit():
                out.add((key, int(name)))
    return out


def check_complete(root: str, expected: list[tuple[str, int]], what: str) -> None:
    """Raise when any expected (array_key, index) has no marker."""
    have = done_set(root)
    missing = [e for e in expected if e not in have]
    if missing:
        show = ", ".join(f"{k}[{i}]" for k, i in missing[:8])
        raise EdiceError(
            f"{what} at {root} is missing {len(missing)} of {len(expected)} chunks "
            f"({show}{', ...' if len(missing) > 8 else ''}), so it was not finalised; "
            "run the same command again to compute the missing chunks."
        )


def finalise(root: str, final: str) -> None:
    """Drop the markers and rename ``root`` to ``final`` (which must not exist)."""
    storage.remove(storage.join(root, DONE))
    if storage.exists(final):
        storage.remove(final)
    storage.rename(root, final)
