"""Helpers of the failure tests: run ``edice`` and take its error paragraph, hash a folder
tree (to show that a refused or failed command changed nothing it does not own), and a
read-only file system."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os

from edice_dist.cli import main


def cli(args, capsys) -> tuple[int, str]:
    """Run ``edice ARGS`` in this process: (exit status, stderr)."""
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def paragraph(err: str, prog: str) -> str:
    """The error paragraph of ``prog`` in ``err``, checked to be one line with no trace."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def tree(root, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256 of the contents}`` of every file under ``root`` (folders
    map to ``"dir"``), leaving out the relative paths in ``skip`` and all under them."""
    root = os.fspath(root)
    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        for name in dirs + files:
            rel = os.path.normpath(os.path.join(rel_d, name))
            if any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in skip):
                continue
            p = os.path.join(d, name)
            if os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The paths added, removed or changed between two :func:`tree` results."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def read_only(monkeypatch, root) -> None:
    """Make every write under ``root`` fail with ``OSError(EROFS)``, as on a read-only
    mount: creating folders, opening files for writing, renaming and removing.

    The tests run as root, whom a folder of mode 0o555 does not stop, and mounting a
    read-only file system needs privileges a test does not have: so the OS calls are
    replaced, for this process only (every stage's first write is made by its driver).
    """
    root = os.path.abspath(os.fspath(root))

    def under(path) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.abspath(os.fsdecode(os.fspath(path)))
        return p == root or p.startswith(root + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(path)))

    def guard(fn, *, writing=lambda *a, **k: True, n_paths=1):
        def wrapped(*args, **kwargs):
            for p in args[:n_paths]:
                if under(p) and writing(*args, **kwargs):
                    refuse(p)
            return fn(*args, **kwargs)
        return wrapped

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_flags(path, flags, *a, **k):
        return bool(flags & write_flags)

    def open_mode(file, mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    for name in ("mkdir", "remove", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), n_paths=2))
    monkeypatch.setattr(os, "open", guard(os.open, writing=open_flags))
    for mod in (builtins, io):
        monkeypatch.setattr(mod, "open", guard(mod.open, writing=open_mode))
