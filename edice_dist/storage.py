"""Paths that may be local or URLs (``s3://bucket/key``, any fsspec protocol).

Credentials and endpoints come from the environment as AWS tools expect them
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import fsspec

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read at import (os.umask can only be read by setting it)


def is_url(path: str) -> bool:
    """True for ``proto://...`` paths other than ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def _strip_file(path: str) -> str:
    path = str(path)
    return path[len("file://") :] if path.startswith("file://") else path


def storage_options(path: str) -> dict:
    """fsspec options for ``path``; S3 endpoints come from ``AWS_ENDPOINT_URL``."""
    if str(path).startswith("s3://"):
        opts: dict = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts
    return {}


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``path`` and the path inside it."""
    if not is_url(path):
        return fsspec.filesystem("file"), os.path.abspath(_strip_file(path))
    fs, inner = fsspec.core.url_to_fs(str(path), **storage_options(path))
    return fs, inner


def absolute(path: str | None) -> str | None:
    """URLs as they are, local paths made absolute: Ray workers and actors may run in
    another working directory than the command that started them."""
    if path is None or is_url(path):
        return path
    return os.path.abspath(_strip_file(str(path)))


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URLs and ``os.path.join`` for local paths."""
    if is_url(base):
        out = str(base).rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return os.path.join(_strip_file(base), *parts)


def child(root: str, *parts: str, what: str = "a name") -> str:
    """``root`` joined with ``parts``, refused when the result would not lie inside ``root``.

    Every output path built from a name that came from a file (a cell type in a model, a
    track id in a store) goes through here, after the names themselves were checked
    (:func:`edice_dist.tracks.check_name`): a second line against writing elsewhere.

    Raises
    ------
    InputError
        Naming ``what`` gave the offending part and the folder it would leave.
    """
    import posixpath

    from .errors import InputError

    path = join(root, *parts)
    if is_url(root):
        base = str(root).rstrip("/")
        inner = posixpath.normpath(path[len(base):].lstrip("/") or ".")
        ok = path.startswith(base + "/") and not inner.startswith("..") and inner != "."
    else:
        base = os.path.normpath(os.path.abspath(_strip_file(root)))
        full = os.path.normpath(os.path.abspath(path))
        ok = full.startswith(base.rstrip(os.sep) + os.sep)
    if not ok or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise InputError(
            f"Refusing to write {path}: {what} ({'/'.join(parts)!r}) would place it outside "
            f"the output folder {root}. Names that become file names may not contain '/' "
            "or be '.' or '..'; fix the name where it comes from."
        )
    return path


def parent(path: str) -> str:
    if is_url(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(_strip_file(path)))


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    if is_url(path):
        return  # object stores have no folders
    fs.makedirs(p, exist_ok=True)


def remove(path: str) -> None:
    """Remove a file or a folder tree; absent paths are fine."""
    fs, p = filesystem(path)
    if not is_url(path):
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)
        return
    if fs.exists(p):
        fs.rm(p, recursive=True)


def rename(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``. Atomic on a local filesystem; on an object store a copy
    followed by a delete, which is why completeness is also recorded in metadata."""
    fs, s = filesystem(src)
    _, d = filesystem(dst)
    if not is_url(src):
        os.replace(s, d)
        return
    if fs.isfile(s):
        fs.mv(s, d)
        return
    # fsspec's recursive mv also copies the folder pseudo-entries of an object store,
    # which fails (NoSuchKey): copy the objects one by one, then delete them.
    files = fs.find(s)
    if not files:
        raise FileNotFoundError(src)
    prefix = s.rstrip("/") + "/"
    targets = [d.rstrip("/") + "/" + f[len(prefix):] for f in files]
    fs.copy(files, targets)
    fs.rm(files)
    fs.invalidate_cache(s)
    fs.invalidate_cache(d)


def list_dir(path: str) -> list[str]:
    """Names (not paths) directly under ``path``; empty when it does not exist."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        return []
    return sorted(basename(x) for x in fs.ls(p, detail=False))


def read_text(path: str) -> str:
    """The text of a UTF-8 file; a leading byte-order mark (as some editors write) is
    dropped, so that a manifest's first column is still called ``cell_type``."""
    with fsspec.open(_strip_file(path) if not is_url(path) else path, "r", encoding="utf-8-sig",
                     **storage_options(path)) as f:
        return f.read()


def read_input(path: str, what: str) -> str:
    """The text of an input file, or an InputError naming ``what`` it is and the path."""
    from .errors import InputError

    try:
        return read_text(path)
    except FileNotFoundError:
        raise InputError(f"{what[:1].upper() + what[1:]} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Cannot read {what} {path}: {e}.") from None


def read_json(path: str, hint: str) -> dict | None:
    """A JSON record (a run's ``run.json``, a model folder's ``train.json``); None when the
    file does not exist, an InputError naming it and ending with ``hint`` (what to do) when
    it cannot be read."""
    import json

    from .errors import InputError

    if not exists(path):
        return None
    try:
        return json.loads(read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is unreadable ({e}). {hint}") from None


def read_bytes(path: str) -> bytes:
    with fsspec.open(_strip_file(path) if not is_url(path) else path, "rb",
                     **storage_options(path)) as f:
        return f.read()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it."""
    if is_url(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, data)  # a single PUT: atomic on object stores
        return
    path = os.path.abspath(_strip_file(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        # mkstemp makes the file private (0600); give it the mode of any new file, so that a
        # web server can read a hub or report written here.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:  # a full disk names no file
            raise OSError(e.errno, e.strerror, path) from e
        raise


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


@contextlib.contextmanager
def local_copy(path: str, suffix: str = "") -> Iterator[str]:
    """A local file path with the contents of ``path`` (downloaded when it is a URL),
    for libraries such as pyBigWig that read local files only."""
    if not is_url(path):
        yield os.path.abspath(_strip_file(path))
        return
    fs, p = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="edice-") as tmp:
        local = os.path.join(tmp, "file" + suffix)
        fs.get(p, local)
        yield local


def upload(local_path: str, dst: str) -> None:
    """Copy a local file to ``dst`` (local path or URL), atomically where the target allows."""
    if is_url(dst):
        fs, d = filesystem(dst)
        fs.put(local_path, d)
        return
    dst = os.path.abspath(_strip_file(dst))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = os.path.join(os.path.dirname(dst), ".tmp-" + os.path.basename(dst))
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, dst)


def zarr_store(path: str, read_only: bool = False, strict: bool = False):
    """A zarr v3 store object for a local path or URL.

    With ``strict``, reading a chunk that is not there raises an InputError naming it
    instead of returning the array's fill value, which is what zarr does (so a deleted
    chunk of a finished store would read as zeros). The writers of finished stores write
    every chunk, empty ones included, so that any missing one is damage.
    """
    import zarr.storage

    if is_url(path):
        store = zarr.storage.FsspecStore.from_url(
            path, storage_options=storage_options(path), read_only=read_only
        )
    else:
        store = zarr.storage.LocalStore(os.path.abspath(_strip_file(path)), read_only=read_only)
    return _strict_store(store, path) if strict else store


def is_chunk_key(key: str) -> bool:
    """A chunk (or shard) key of a zarr v3 array (``<array>/c/<i>/<j>``), not metadata."""
    return key.startswith("c/") or "/c/" in key


def _strict_store(store, root: str):
    """``store`` wrapped so that a missing chunk raises (see :func:`zarr_store`)."""
    from zarr.storage import WrapperStore

    from .errors import InputError

    def missing(key: str) -> InputError:
        return InputError(
            f"The chunk file {join(root, key)} is missing: the store is damaged (a finished "
            "store has every chunk). Re-create it with the command that wrote it (`edice "
            "ingest`, or `edice impute --force` for an imputation's output).")

    class StrictStore(WrapperStore):
        async def get(self, key, prototype, byte_range=None):
            value = await self._store.get(key, prototype, byte_range)
            if value is None and is_chunk_key(key):
                raise missing(key)
            return value

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            values = await self._store.get_partial_values(prototype, key_ranges)
            for (key, _), value in zip(key_ranges, values, strict=True):
                if value is None and is_chunk_key(key):
                    raise missing(key)
            return values

        def _with_store(self, store):
            return _strict_store(store, root)

    return StrictStore(store)
