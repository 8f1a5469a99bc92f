"""The bytes of a bigWig's header: layout checks, the total summary, the chromosome list.

Read through ``read(offset, n)``, from a local file or by byte ranges of a URL, so that a
bigWig in object storage is validated from a few kB of its header instead of a download
of the whole file (hundreds of MB for a genome-wide track): ingest's validation and
``edice evaluate``'s header checks read sources this way, and the values once, elsewhere
(:mod:`edice_dist.sources`).
"""

from __future__ import annotations

import math
import struct

from . import storage
from .errors import InputError

BIGWIG_MAGIC = (b"\x26\xfc\x8f\x88", b"\x88\x8f\xfc\x26")  # 0x888FFC26, either byte order


def _who(path: str, label: str | None) -> str:
    return f"{path} (track {label})" if label else str(path)


def local_reader(local: str):
    """``read(offset, n)`` of a local file, for the header checks below."""
    def read(offset: int, n: int) -> bytes:
        with open(local, "rb") as f:
            f.seek(offset)
            return f.read(n)
    return read


def check_layout(read, size: int, who: str) -> None:
    """Check the header's offsets against the file size before pyBigWig sees the file:
    libBigWig follows them blindly and crashes the process on a truncated file.

    ``read(offset, n)`` returns the file's bytes (a local file or byte ranges of a URL)."""
    head = read(0, 64)
    order = "<" if head[:4] == BIGWIG_MAGIC[0] else ">"
    bad = len(head) < 64
    if not bad:
        _, _, n_zooms, chrom_tree, data, index = struct.unpack(order + "IHHQQQ", head[:32])
        zooms = read(64, 24 * n_zooms) if n_zooms else b""
        bad = len(zooms) < 24 * n_zooms or max(chrom_tree, data, index) >= size
        for k in range(n_zooms if not bad else 0):
            _, _, z_data, z_index = struct.unpack(order + "IIQQ", zooms[24 * k: 24 * k + 24])
            bad = bad or max(z_data, z_index) >= size
    if bad:
        raise InputError(
            f"{who} is a truncated or corrupted bigWig ({size:,} bytes; its header points "
            "past the end of the file). Download or create it again."
        )


def summary_may_hold_nan(read) -> bool:
    """False when the file's total summary has a finite sum of values (a stored NaN makes
    it NaN); True when there is no summary or it is NaN."""
    head = read(0, 64)
    order = "<" if head[:4] == BIGWIG_MAGIC[0] else ">"
    version = struct.unpack(order + "H", head[4:6])[0]
    offset = struct.unpack(order + "Q", head[44:52])[0]
    if version < 2 or offset == 0:
        return True
    block = read(offset, 40)
    if len(block) < 40:
        return True
    _, _, _, total, squares = struct.unpack(order + "Qdddd", block)
    return math.isnan(total) or math.isnan(squares)


CHROM_TREE_MAGIC = 0x78CA8C91
HEADER_PREFETCH_MAX = 1 << 20
"""Bytes fetched at once for a bigWig's header region (zoom headers, summary, chromosome
tree; they precede the data in the files of UCSC's tools and of libBigWig)."""


class _Ranges:
    """Byte ranges of a file (a local path or a URL), each fetched once.

    The header of a bigWig in object storage costs a few hundred bytes to a few kB this
    way instead of a download of the whole file (hundreds of MB for a genome-wide track).
    """

    def __init__(self, path: str):
        self.fs, self.inner = storage.filesystem(path)
        self.size = int(self.fs.info(self.inner).get("size") or 0)
        self._have: list[tuple[int, bytes]] = []

    def fetch(self, start: int, stop: int) -> None:
        stop = min(stop, self.size)
        if stop > start:
            self._have.append((start, self.fs.cat_file(self.inner, start=start, end=stop)))

    def read(self, offset: int, n: int) -> bytes:
        for start, data in self._have:
            if start <= offset and offset + n <= start + len(data):
                return data[offset - start: offset - start + n]
        self.fetch(offset, offset + n)
        start, data = self._have[-1] if self._have else (offset, b"")
        return data[offset - start: offset - start + n] if start == offset else b""


class Header:
    """The chromosomes of a bigWig read from its header alone (no values): what
    validation needs of a source, as :class:`Source` gives it (``path``, ``label``,
    :meth:`chroms`)."""

    kind = "bigwig"

    def __init__(self, path: str, label: str | None, chroms: dict[str, int]):
        self.path, self.label = path, label or ""
        self._chroms = dict(chroms)

    def chroms(self) -> dict[str, int]:
        return dict(self._chroms)


def _chrom_tree(read, offset: int, order: str, who: str) -> dict[str, int]:
    """The chromosome B+ tree of a bigWig: {name: size} in the file's order."""
    head = read(offset, 32)
    if len(head) < 32 or struct.unpack(order + "I", head[:4])[0] != CHROM_TREE_MAGIC:
        raise InputError(f"{who} cannot be opened as a bigWig (its chromosome list is "
                         "unreadable). The file may be truncated or corrupted; download or "
                         "create it again.")
    _, _, key_size, _, n_items = struct.unpack(order + "IIIIQ", head[:24])
    out: dict[str, int] = {}
    stack, seen = [offset + 32], 0
    while stack:
        node = stack.pop()
        seen += 1
        top = read(node, 4)
        if len(top) < 4 or seen > n_items + 64:
            raise InputError(f"{who} cannot be opened as a bigWig (its chromosome list is "
                             "damaged). Download or create it again.")
        leaf, _, count = struct.unpack(order + "BBH", top)
        item = key_size + 8
        body = read(node + 4, count * item)
        if len(body) < count * item:
            raise InputError(f"{who} cannot be opened as a bigWig (its chromosome list is "
                             "truncated). Download or create it again.")
        children = []
        for k in range(count):
            rec = body[k * item:(k + 1) * item]
            if leaf:
                _, size = struct.unpack(order + "II", rec[key_size:])
                out[rec[:key_size].rstrip(b"\0").decode("utf-8", "replace")] = int(size)
            else:
                children.append(struct.unpack(order + "Q", rec[key_size:])[0])
        stack.extend(reversed(children))  # depth first, keys in file order
    return out


def read_header(path: str, label: str | None = None, shown: str | None = None) -> Header | None:
    """The chromosomes of the bigWig at ``path`` (local or URL) from its header bytes only.

    Returns None when the file is not a bigWig (a bedGraph, or something else: open it
    with :func:`open_source`, which reads it whole and says what is wrong).

    Raises
    ------
    InputError
        A missing file, or a bigWig whose header is truncated or damaged.
    """
    shown = shown or str(path)
    who = _who(shown, label)
    if not storage.exists(path):
        raise InputError(f"{who} does not exist. Fix the path in the manifest "
                         "(relative paths are relative to the manifest's folder).")
    r = _Ranges(path)
    head = r.read(0, 64)
    if head[:4] not in BIGWIG_MAGIC:
        return None
    check_layout(r.read, r.size, who)
    order = "<" if head[:4] == BIGWIG_MAGIC[0] else ">"
    chrom_tree, data = struct.unpack(order + "QQ", head[8:24])
    if 64 < data <= HEADER_PREFETCH_MAX and chrom_tree < data:
        r.fetch(64, data)  # zoom headers, summary and chromosome tree in one request
    return Header(shown, label, _chrom_tree(r.read, chrom_tree, order, who))
