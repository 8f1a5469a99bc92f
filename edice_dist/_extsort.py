"""External sort of unique uint64 keys with payload columns, in memory that does not
grow with the number of keys.

Rank-based metrics need a genome-wide order of 124 M values per track. Keys are made
unique and totally ordered by combining an order-preserving 32-bit encoding of a
float32 value with the value's 32-bit genome index (:func:`combined_keys`), so sorting
the keys sorts by value with ties in genome order.

Keys arrive in pieces (:meth:`ExternalSorter.add`); every ``run_size`` of them are sorted
in memory and spilled with their payload to a temporary folder as ``.npy`` files. The
runs are then merged block-wise: a block of every run is loaded, everything up to the
smallest "last loaded key" among runs that still have data on disk is emitted (that key
bounds what any unread part of any run can hold), and emptied runs load their next
block. Memory is ``O(run_size + merge_size)`` whatever the number of keys.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

_SIGN = np.uint32(0x80000000)
_LOW32 = np.uint64(0xFFFFFFFF)
MAX_INDEX = 2**32
"""Genome indices must be below this (hg38 at 25 bp has ~124 M bins)."""


def float_keys(values: np.ndarray, descending: bool = True) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values.

    Non-negative floats get their sign bit set; negative floats have all bits flipped, so
    unsigned order equals float order. ``-0.0`` is folded into ``+0.0`` first so that values
    equal as floats get equal keys. With ``descending`` the keys are inverted, so an
    ascending sort of keys is a descending sort of values.

    Parameters
    ----------
    values : np.ndarray, shape (n,)
        Finite values; cast to float32.

    Returns
    -------
    np.ndarray, shape (n,), uint32
    """
    v = np.asarray(values, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
    bits = v.view(np.uint32)
    keys = np.where(bits & _SIGN, ~bits, bits | _SIGN)
    return ~keys if descending else keys


def key_values(keys: np.ndarray, descending: bool = True) -> np.ndarray:
    """The float32 values of uint32 keys made by :func:`float_keys` (its inverse).

    Parameters
    ----------
    keys : np.ndarray, shape (n,)
        uint32 keys, or uint64 keys whose low 32 bits are taken.
    """
    k = np.asarray(keys).astype(np.uint32, copy=False)
    if descending:
        k = ~k
    bits = np.where(k & _SIGN, k ^ _SIGN, ~k)
    return bits.view(np.float32)


def combined_keys(values: np.ndarray, index: np.ndarray | int, descending: bool = True) -> np.ndarray:
    """Unique uint64 sort keys ``float_key(value) << 32 | genome_index``.

    Parameters
    ----------
    values : np.ndarray, shape (n,)
        float32 values.
    index : np.ndarray of shape (n,), or int
        Genome index of each value, or the index of the first one when the values are
        consecutive bins.

    Returns
    -------
    np.ndarray, shape (n,), uint64
        Ascending order = values in ``descending`` (or ascending) order, ties by index.
    """
    k = float_keys(values, descending).astype(np.uint64) << np.uint64(32)
    if np.isscalar(index):
        if index < 0 or index + len(k) > MAX_INDEX:
            raise ValueError(f"genome index {index} + {len(k)} is outside [0, 2**32)")
        idx = np.arange(index, index + len(k), dtype=np.uint64)
    else:
        idx = np.asarray(index).astype(np.uint64, copy=False)
    return k | idx


def key_index(keys: np.ndarray) -> np.ndarray:
    """The genome index (low 32 bits) of combined keys, as int64."""
    return (np.asarray(keys, dtype=np.uint64) & _LOW32).astype(np.int64)


def key_value_part(keys: np.ndarray) -> np.ndarray:
    """The value key (high 32 bits) of combined keys, as uint32: equal for tied values."""
    return (np.asarray(keys, dtype=np.uint64) >> np.uint64(32)).astype(np.uint32)


def sort_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort`` of unique uint64 keys, faster for keys added in genome order.

    When the low 32 bits (the genome index) increase along ``keys``, replacing them by the
    position in the array keeps the order, and a plain ``np.sort`` of those tagged keys
    (vectorised, several times faster than ``argsort``) yields the permutation."""
    keys = np.asarray(keys, dtype=np.uint64)
    if 1 < len(keys) < MAX_INDEX:
        low = keys & _LOW32
        if np.all(low[1:] > low[:-1]):
            tagged = (keys & ~_LOW32) | np.arange(len(keys), dtype=np.uint64)
            return (np.sort(tagged) & _LOW32).astype(np.intp)
    return np.argsort(keys)


class _Run:
    """One spilled run: a ``.npy`` file per column, read block by block with plain reads
    (a memory map would keep every page it touched resident)."""

    def __init__(self, folder: str, number: int, columns: dict[str, np.ndarray]):
        self.files: dict[str, tuple[str, int, np.dtype]] = {}
        for name, arr in columns.items():
            path = os.path.join(folder, f"run{number:05d}-{name}.npy")
            np.save(path, np.ascontiguousarray(arr))
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                self.files[name] = (path, f.tell(), dtype)
        self.size = len(columns["key"])
        self.pos = 0

    def read(self, count: int) -> dict[str, np.ndarray]:
        count = min(count, self.size - self.pos)
        out = {}
        for name, (path, offset, dtype) in self.files.items():
            with open(path, "rb") as f:
                f.seek(offset + self.pos * dtype.itemsize)
                out[name] = np.fromfile(f, dtype=dtype, count=count)
        self.pos += count
        return out

    @property
    def exhausted(self) -> bool:
        return self.pos >= self.size

    def remove(self) -> None:
        for path, _, _ in self.files.values():
            if os.path.exists(path):
                os.remove(path)


def _take(cols: dict[str, np.ndarray], sel) -> dict[str, np.ndarray]:
    return {k: v[sel] for k, v in cols.items()}


class ExternalSorter:
    """Sort unique uint64 keys carrying payload columns, spilling runs to disk.

    Parameters
    ----------
    payload : dict[str, dtype]
        Name and dtype of each payload column that travels with the keys.
    run_size : int
        Keys sorted in memory per run (memory scales with it, not with the key count).
    merge_size : int, optional
        Keys held in memory during the merge, split over the runs (default ``run_size``);
        also the largest block :meth:`sorted_blocks` yields.
    tmpdir : str, optional
        Where the run folder is made (default: the system temporary folder).

    Notes
    -----
    Keys must be unique (see :func:`combined_keys`); duplicate keys would still come out
    sorted but their relative order would be unspecified.
    """

    def __init__(self, payload: dict[str, np.dtype], run_size: int = 1 << 21,
                 merge_size: int | None = None, tmpdir: str | None = None):
        if run_size < 1:
            raise ValueError(f"run_size must be >= 1, got {run_size}")
        if "key" in payload:
            raise ValueError("'key' is reserved for the sort keys")
        self.payload = {k: np.dtype(v) for k, v in payload.items()}
        self.run_size = int(run_size)
        self.merge_size = int(merge_size or run_size)
        if self.merge_size < 1:
            raise ValueError(f"merge_size must be >= 1, got {merge_size}")
        self._tmpdir = tmpdir
        self._folder: str | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._n_pending = 0
        self._runs: list[_Run] = []
        self.n = 0

    @property
    def n_runs(self) -> int:
        return len(self._runs)

    def add(self, keys: np.ndarray, **columns: np.ndarray) -> None:
        """Add keys of shape (m,) and one array of shape (m,) per payload column."""
        keys = np.asarray(keys)
        if keys.dtype != np.uint64 or keys.ndim != 1:
            raise ValueError(f"keys must be a 1-D uint64 array, got {keys.dtype} {keys.shape}")
        if set(columns) != set(self.payload):
            raise ValueError(f"payload columns {sorted(columns)} != {sorted(self.payload)}")
        piece = {"key": keys}
        for name, dtype in self.payload.items():
            col = np.asarray(columns[name]).astype(dtype, copy=False)
            if col.shape != keys.shape:
                raise ValueError(f"payload {name!r} has shape {col.shape}, keys {keys.shape}")
            piece[name] = col
        if len(keys) == 0:
            return
        self._pending.append(piece)
        self._n_pending += len(keys)
        self.n += len(keys)
        while self._n_pending >= self.run_size:
            whole = self._concat_pending()
            self._spill(_take(whole, slice(0, self.run_size)))
            rest = _take(whole, slice(self.run_size, None))
            self._pending = [rest] if len(rest["key"]) else []
            self._n_pending = len(rest["key"])

    def _concat_pending(self) -> dict[str, np.ndarray]:
        if len(self._pending) == 1:
            return self._pending[0]
        return {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}

    @staticmethod
    def _sorted(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _take(cols, sort_order(cols["key"]))

    def _spill(self, cols: dict[str, np.ndarray]) -> None:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="edice-sort-", dir=self._tmpdir)
        self._runs.append(_Run(self._folder, len(self._runs), self._sorted(cols)))

    def sorted_blocks(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield ``(keys, payload)`` blocks in ascending key order, each at most
        ``max(merge_size, n_runs)`` long. Can be called once."""
        rest = self._concat_pending() if self._pending else None
        self._pending, self._n_pending = [], 0
        if not self._runs:
            if rest is not None:
                whole = self._sorted(rest)
                for s in range(0, len(whole["key"]), self.merge_size):
                    block = _take(whole, slice(s, s + self.merge_size))
                    yield block.pop("key"), block
            return
        if rest is not None:
            self._spill(rest)
        yield from self._merge()

    def _merge(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        runs = self._runs
        per_run = max(1, self.merge_size // len(runs))
        bufs: list[dict[str, np.ndarray] | None] = [None] * len(runs)
        while True:
            for i, r in enumerate(runs):
                if (bufs[i] is None or len(bufs[i]["key"]) == 0) and not r.exhausted:
                    bufs[i] = r.read(per_run)
            live = [i for i, b in enumerate(bufs) if b is not None and len(b["key"])]
            if not live:
                return
            # A run with unread data can hold nothing below its last loaded key, so every
            # buffered key up to the smallest such key is final.
            bounds = [bufs[i]["key"][-1] for i in live if not runs[i].exhausted]
            limit = min(bounds) if bounds else None
            parts = []
            for i in live:
                b = bufs[i]
                cut = len(b["key"]) if limit is None else int(
                    np.searchsorted(b["key"], limit, side="right"))
                if cut:
                    parts.append(_take(b, slice(0, cut)))
                    bufs[i] = _take(b, slice(cut, None))
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            # The pieces are sorted runs: a stable (merge-based) sort is fastest here.
            order = np.argsort(cols["key"], kind="stable")
            block = _take(cols, order)
            yield block.pop("key"), block

    def close(self) -> None:
        """Remove the run files (also done on exit of a ``with`` block)."""
        for r in self._runs:
            r.remove()
        self._runs = []
        self._pending = []
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> ExternalSorter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass
