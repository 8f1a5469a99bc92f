"""The UCSC track hub of an imputation run: what lets a biologist look at the imputed
tracks in a genome browser, beside the observed ones.

```
RUN_DIR/bigwig/
  hub.txt           the hub: name, labels, contact; genomesFile genomes.txt
  genomes.txt       genome <assembly>; trackDb trackDb.txt
  trackDb.txt       one composite track per assay (below)
  <cell_key>-<assay>.bigWig    the imputed tracks (written by the export)
  observed/<cell_key>-<assay>.bigWig   observed tracks of the store (copies or links),
                    only with ``hub_observed`` copy or link
```

Every path in the hub is relative (to the file that names it), so the folder can be
copied as it is to any web server or bucket and loaded by the URL of ``hub.txt`` in the
UCSC browser (My Data > Track Hubs) or in IGV. An observed track whose source is an
``http(s)``/``ftp`` URL may be linked by that URL instead: browsers read it there.

Organisation: one composite track per assay, as consortia publish imputed epigenomes and
as a biologist compares a mark across tissues. Its subtracks carry two subgroups, ``cell``
(the cell key) and ``kind`` (a :data:`KINDS` entry: imputed, observed, spread), which make
the composite's matrix (cell types down, kinds across). A second bigWig per target, such
as a per-bin spread, is one more :class:`HubTrack` of another kind: it lands in the same
composite, beside the imputation it qualifies. Each assay has one colour (Roadmap's
conventional mark colours where known, a stable generated one otherwise); observed
subtracks are a darker shade of it, spread a lighter one. All subtracks of an assay share
one y scale (``autoScale group``), so that imputed and observed signal compare by eye.

The genome is ``genome`` when given, else the UCSC assembly whose chromosome sizes the
run's match (:data:`ASSEMBLY_SIZES`), else ``hg38``. Only assemblies the browser knows
work: an assembly hub for another genome (``twoBitPath``) is out of scope.
"""

from __future__ import annotations

import colorsys
import hashlib
import os
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from . import runfolder, storage
from .errors import InputError
from .progress import log
from .runfolder import bigwig_name

HUB_TXT = "hub.txt"
GENOMES_TXT = "genomes.txt"
TRACKDB_TXT = "trackDb.txt"
OBSERVED_DIR = "observed"
DEFAULT_GENOME = "hg38"
DEFAULT_EMAIL = "nobody@example.org"
SHORT_LABEL_MAX = 17
"""UCSC shows at most 17 characters of a short label (trackDb documentation)."""
LONG_LABEL_MAX = 76
"""... and at most 76 of a long label."""
NAME_MAX = 64
"""Track names are database keys in the browser: kept short, and unique."""
OBSERVED_MODES = ("none", "link", "copy")

# ----------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """What a subtrack shows about its (cell, assay): the ``kind`` subgroup of the hub.

    Attributes
    ----------
    name : subgroup tag and track-name suffix.
    label : subgroup label (the column of the composite's matrix).
    short : suffix of short labels (``liver H3K4me3 obs``; none for the imputation).
    phrase : how long labels start (``Imputed``).
    shade : colour change from the assay's: < 0 darker, > 0 lighter, 0 none.
    """

    name: str
    label: str
    short: str
    phrase: str
    shade: float = 0.0


KINDS = {k.name: k for k in (
    Kind("imputed", "Imputed", "", "Imputed"),
    Kind("observed", "Observed", "obs", "Observed", -0.35),
    # Reserved for a per-bin spread of the imputation (one more bigWig per target).
    Kind("spread", "Spread", "sd", "Spread of imputed", 0.5),
)}
"""Kinds in the order of the composite's matrix columns."""


@dataclass(frozen=True)
class HubTrack:
    """One bigWig of the hub.

    Attributes
    ----------
    cell_key, assay : what it measures (``cell_type@individual`` for individuals).
    kind : a :data:`KINDS` name.
    url : where the browser reads it: a path relative to the hub folder (written
        percent-encoded) or an absolute ``http(s)://``/``ftp://`` URL.
    note : appended to the long label (e.g. ``held out``).
    """

    cell_key: str
    assay: str
    kind: str
    url: str
    note: str = ""


# ----------------------------------------------------------------------------- names


def track_name(text: str) -> str:
    """``text`` as a trackDb name: letters, digits and ``_`` only, starting with a letter
    (the rule of UCSC's hubCheck, stricter than the ``-``/``.`` some browsers allow)."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "track"
    if not name[0].isalpha():
        name = "t" + name
    return name[:NAME_MAX]


def _unique(names: list[str], limit: int) -> list[str]:
    """``names`` made unique by a ``_2``-style counter at the end, within ``limit`` chars;
    the first of equal names keeps its own."""
    out: list[str] = []
    seen: set[str] = set()
    for n in names:
        cand, i = n, 1
        while cand in seen:
            i += 1
            tail = f"_{i}"
            cand = n[: limit - len(tail)] + tail
        seen.add(cand)
        out.append(cand)
    return out


def fit_label(parts: list[str], limit: int, keep: int = 5) -> str:
    """Join ``parts`` with spaces in at most ``limit`` characters, shortening the first
    part (the cell) before the others: ``lung@individual7 H3K27ac obs`` becomes
    ``lung@in H3K27ac obs``. Below ``keep`` characters of the first part, the longest
    part gives way instead."""
    parts = [p for p in parts if p]
    while len(" ".join(parts)) > limit:
        i = 0 if len(parts[0]) > keep else max(range(len(parts)), key=lambda j: len(parts[j]))
        if len(parts[i]) <= 1:
            return " ".join(parts)[:limit]
        parts[i] = parts[i][:-1]
    return " ".join(parts)


def _middle_cut(text: str, n: int) -> str:
    """``text`` in ``n`` characters, cut in the middle where a ``~`` marks the cut: cell
    names differ at their ends as often as at their starts (``blo~_01``, ``blo~_02``)."""
    if len(text) <= n:
        return text
    head = n // 2
    return text[:head] + "~" + text[len(text) - (n - 1 - head):]


def subtrack_label(cell: str, assay: str, kind: str, limit: int = SHORT_LABEL_MAX) -> str:
    """The short label of a subtrack, ``<cell> <assay> [<kind>]`` in ``limit`` characters:
    histone H3 marks shortened as biologists write them (``H3K4me3`` -> ``K4me3``) when
    too long, then the cell name cut in its middle, then :func:`fit_label`."""
    parts = [cell, assay, kind]
    if len(" ".join(p for p in parts if p)) > limit and re.match(r"H3K\d", assay):
        parts[1] = assay[2:]
    room = limit - len(" ".join(p for p in parts[1:] if p)) - 1
    if len(" ".join(p for p in parts if p)) > limit and room >= 5:
        parts[0] = _middle_cut(cell, room)
    return fit_label(parts, limit)


def _unique_labels(labels: list[str], limit: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for lab in labels:
        cand, i = lab, 1
        while cand in seen:
            i += 1
            tail = f"~{i}"
            cand = lab[: limit - len(tail)] + tail
        seen.add(cand)
        out.append(cand)
    return out


def _tag_label(text: str) -> str:
    # Subgroup labels are single words in trackDb; the browser shows "_" as a space.
    return re.sub(r"[\s=]+", "_", text)


# ----------------------------------------------------------------------------- colours

ASSAY_COLORS = {
    "h3k4me3": (255, 0, 0),
    "h3k4me2": (232, 72, 40),
    "h3k9ac": (250, 110, 70),
    "h3k27ac": (255, 140, 0),
    "h3k4me1": (230, 180, 0),
    "h3k36me3": (0, 150, 0),
    "h3k79me2": (100, 170, 60),
    "h4k20me1": (70, 150, 110),
    "h3k27me3": (110, 130, 180),
    "h3k9me3": (120, 100, 150),
    "h2az": (200, 90, 160),
    "dnase": (150, 200, 30),
    "atac": (120, 170, 30),
    "ctcf": (30, 110, 200),
}
"""Roadmap's conventional colours of marks (keys: lower case, letters and digits only):
active promoter marks red, enhancer marks orange and yellow, transcription green,
polycomb grey-blue, heterochromatin purple-grey, open chromatin green-yellow."""


def _norm_assay(assay: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", assay.lower())
    for suffix in ("seq",):  # DNase-seq, ATAC-seq, ChIP-seq names
        if key.endswith(suffix) and key[: -len(suffix)] in ASSAY_COLORS:
            return key[: -len(suffix)]
    return key


def assay_color(assay: str) -> tuple[int, int, int]:
    """The RGB colour of an assay: :data:`ASSAY_COLORS`, else one derived from a hash of
    its name (the same in every run and on every machine)."""
    key = _norm_assay(assay)
    if key in ASSAY_COLORS:
        return ASSAY_COLORS[key]
    hue = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.8)
    return round(r * 255), round(g * 255), round(b * 255)


def shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Darker (``amount`` < 0, towards black) or lighter (> 0, towards white)."""
    if amount < 0:
        return tuple(round(c * (1 + amount)) for c in rgb)
    return tuple(round(c + (255 - c) * amount) for c in rgb)


def _rgb(c) -> str:
    return ",".join(str(int(v)) for v in c)


# ----------------------------------------------------------------------------- genome

ASSEMBLY_SIZES = {
    "hg38": {"chr1": 248956422, "chr21": 46709983, "chr22": 50818468, "chrX": 156040895},
    "hg19": {"chr1": 249250621, "chr21": 48129895, "chr22": 51304566, "chrX": 155270560},
    "hs1": {"chr1": 248387328},
    "mm10": {"chr1": 195471971, "chrX": 171031299},
    "mm39": {"chr1": 195154279, "chrX": 169476592},
}
"""Sizes of a few chromosomes of the common UCSC assemblies, to recognise a run's genome."""


def guess_genome(chroms: Iterable[tuple[str, int]]) -> str | None:
    """The assembly of :data:`ASSEMBLY_SIZES` whose sizes every listed chromosome of
    ``chroms`` matches (``1`` counts as ``chr1``); None when none does."""
    sizes = {(c if c.startswith("chr") else f"chr{c}"): int(s) for c, s in chroms}
    for name, known in ASSEMBLY_SIZES.items():
        shared = [c for c in known if c in sizes]
        if shared and all(sizes[c] == known[c] for c in shared):
            return name
    return None


def check_genome(genome: str | None) -> None:
    """Refuse a ``genome`` that cannot be a UCSC assembly name (before any work)."""
    if genome is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.]*", genome):
        raise InputError(f"--genome {genome!r} is not a UCSC assembly name (such as hg38, "
                         "hg19, mm10).")


def resolve_genome(genome: str | None, chroms: list[tuple[str, int]]) -> str:
    """``genome`` as given (checked), else recognised from ``chroms``, else
    :data:`DEFAULT_GENOME` (said in the log: the hub then needs ``--genome``)."""
    found = guess_genome(chroms)
    check_genome(genome)
    if genome:
        if found and found != genome:
            log(f"hub: --genome {genome}, but the chromosome sizes are those of {found}.")
        return genome
    if found:
        return found
    log(f"hub: the chromosome sizes match no assembly edice knows; the hub says "
        f"{DEFAULT_GENOME}. Set --genome to the run's UCSC assembly name.")
    return DEFAULT_GENOME


# ----------------------------------------------------------------------------- text


VIEW_LIMITS = {"pval": "0:20", "arcsinh": "0:4"}
"""The y range when a user turns autoscaling off: -log10 p 20 is a strong peak."""

ASSAY_ORDER = ("h3k4me3", "h3k4me2", "h3k9ac", "h3k27ac", "h3k4me1", "h3k36me3", "h3k79me2",
               "h4k20me1", "h3k27me3", "h3k9me3", "h2az", "dnase", "atac", "ctcf")
"""Composite order in the browser: promoter, enhancer, transcription, repressive marks,
open chromatin (Roadmap's order); other assays after them, by name."""
DEFAULT_ON = 10
"""Subtracks shown when the hub is loaded, about (UCSC's guideline for hubs: no more than
10 tracks on by default): the first cell types of each assay, every kind of a cell type
together. The rest are a tick away in each composite's matrix."""


def _stanza(pairs: list[tuple[str, str]], indent: str = "") -> str:
    return "\n".join(f"{indent}{k} {v}" for k, v in pairs) + "\n"


def _url(url: str) -> str:
    """Relative paths percent-encoded (``@``, ``+``, brackets are legal in cell names and
    mean other things in URLs; S3 reads ``+`` as a space); absolute URLs as they are."""
    if "://" in url:
        return url
    return urllib.parse.quote(url, safe="/")


def trackdb_text(tracks: list[HubTrack], space: str = "pval", source: str = "eDICE") -> str:
    """The ``trackDb.txt`` of ``tracks``: a composite per assay, a subtrack per track.

    Raises
    ------
    ValueError
        A track of an unknown kind, or two tracks of the same (cell, assay, kind).
    """
    seen = set()
    for t in tracks:
        if t.kind not in KINDS:
            raise ValueError(f"unknown hub track kind {t.kind!r}; kinds are {', '.join(KINDS)}")
        if (t.cell_key, t.assay, t.kind) in seen:
            raise ValueError(f"two {t.kind} hub tracks for {t.cell_key} {t.assay}")
        seen.add((t.cell_key, t.assay, t.kind))
    assays = sorted({t.assay for t in tracks}, key=lambda a: (
        ASSAY_ORDER.index(_norm_assay(a)) if _norm_assay(a) in ASSAY_ORDER else len(ASSAY_ORDER),
        a))
    cells = sorted({t.cell_key for t in tracks})
    cell_tags = dict(zip(cells, _unique([track_name(c) for c in cells], NAME_MAX), strict=True))
    by_assay = {a: sorted((t for t in tracks if t.assay == a),
                          key=lambda t: (t.cell_key, list(KINDS).index(t.kind)))
                for a in assays}
    # Names and labels, unique over the whole hub (composites first).
    subs = [t for a in assays for t in by_assay[a]]
    names = _unique([track_name(a) for a in assays]
                    + [track_name(f"{cell_tags[t.cell_key]}_{t.assay}_{t.kind}") for t in subs],
                    NAME_MAX)
    comp_names, sub_names = names[:len(assays)], names[len(assays):]
    shorts = _unique_labels(
        [fit_label([a], SHORT_LABEL_MAX) for a in assays]
        + [subtrack_label(t.cell_key, t.assay, KINDS[t.kind].short) for t in subs],
        SHORT_LABEL_MAX)
    unit = "-log10 p" if space == "pval" else "arcsinh(-log10 p)"
    longs = _unique_labels(
        [fit_label([f"{a} by cell type: " + ", ".join(
            (f"{KINDS[k].label.lower()} ({source})" if k == "imputed" else KINDS[k].label.lower())
            for k in KINDS if any(t.kind == k for t in by_assay[a])) + f"; {unit}"],
            LONG_LABEL_MAX) for a in assays]
        + [fit_label([f"{KINDS[t.kind].phrase} {t.assay} in {_describe_cell(t.cell_key)}"
                      f"{', ' + t.note if t.note else ''} ({unit})"], LONG_LABEL_MAX)
           for t in subs],
        LONG_LABEL_MAX)
    comp_shorts, sub_shorts = shorts[:len(assays)], shorts[len(assays):]
    comp_longs, sub_longs = longs[:len(assays)], longs[len(assays):]

    out = [f"# Track hub of an eDICE imputation (edice-dist). Values: {unit}.\n"]
    k = 0
    for i, a in enumerate(assays):
        members = by_assay[a]
        color = assay_color(a)
        a_cells = list(dict.fromkeys(t.cell_key for t in members))
        a_kinds = [kd for kd in KINDS if any(t.kind == kd for t in members)]
        shown = set(a_cells[:max(1, DEFAULT_ON // len(assays) // len(a_kinds))])
        out.append(_stanza([
            ("track", comp_names[i]),
            ("compositeTrack", "on"),
            ("type", "bigWig"),
            ("shortLabel", comp_shorts[i]),
            ("longLabel", comp_longs[i]),
            ("subGroup1", "cell Cell_type " + " ".join(
                f"{cell_tags[c]}={_tag_label(c)}" for c in a_cells)),
            ("subGroup2", "kind Data " + " ".join(
                f"{kd}={KINDS[kd].label}" for kd in a_kinds)),
            ("dimensions", "dimX=kind dimY=cell"),
            ("sortOrder", "cell=+ kind=+"),
            ("visibility", "full"),
            ("priority", str(i + 1)),
            ("color", _rgb(color)),
            ("autoScale", "group"),
            ("alwaysZero", "on"),
            ("viewLimits", VIEW_LIMITS.get(space, VIEW_LIMITS["pval"])),
            ("maxHeightPixels", "100:40:8"),
            ("windowingFunction", "mean+whiskers"),
            ("graphTypeDefault", "bar"),
        ]))
        for t in members:
            out.append(_stanza([
                ("track", sub_names[k]),
                ("parent", f"{comp_names[i]} {'on' if t.cell_key in shown else 'off'}"),
                ("type", "bigWig"),
                ("bigDataUrl", _url(t.url)),
                ("shortLabel", sub_shorts[k]),
                ("longLabel", sub_longs[k]),
                ("subGroups", f"cell={cell_tags[t.cell_key]} kind={t.kind}"),
                ("color", _rgb(shade(color, KINDS[t.kind].shade))),
            ], indent="    "))
            k += 1
    return "\n".join(out)


def _describe_cell(cell_key: str) -> str:
    cell, _, ind = cell_key.partition("@")
    return f"{cell}, individual {ind}" if ind else cell


def hub_text(name: str, short: str, long: str, email: str) -> str:
    """``hub.txt``: the hub's name (a track name), labels within UCSC's limits, contact."""
    return _stanza([("hub", track_name(name)),
                    ("shortLabel", fit_label([short], SHORT_LABEL_MAX)),
                    ("longLabel", fit_label([long], LONG_LABEL_MAX)),
                    ("genomesFile", GENOMES_TXT),
                    ("email", email)])


def genomes_text(genome: str) -> str:
    return _stanza([("genome", genome), ("trackDb", TRACKDB_TXT)])


def write_hub(folder: str, tracks: list[HubTrack], genome: str, *, space: str = "pval",
              name: str = "edice", long_label: str = "",
              email: str = DEFAULT_EMAIL) -> dict[str, str]:
    """Write ``trackDb.txt``, ``genomes.txt`` and ``hub.txt`` into ``folder``, each
    atomically and ``hub.txt`` last, so that no browser reads a hub that is half written.

    Returns
    -------
    dict
        File name -> path.
    """
    if not tracks:
        raise InputError(f"No tracks for the hub in {folder}.")
    files = {n: storage.join(folder, n) for n in (TRACKDB_TXT, GENOMES_TXT, HUB_TXT)}
    storage.write_text_atomic(files[TRACKDB_TXT], trackdb_text(tracks, space))
    storage.write_text_atomic(files[GENOMES_TXT], genomes_text(genome))
    long_label = long_label or f"eDICE imputed tracks: {name}"
    storage.write_text_atomic(files[HUB_TXT], hub_text(f"edice_{name}", f"eDICE {name}",
                                                       long_label, email))
    return files


# ----------------------------------------------------------------------------- observed

_BROWSER_URL = re.compile(r"^(https?|ftp)://", re.I)
_BIGWIG = re.compile(r"\.(bigwig|bw)$", re.I)


def observed_tracks(store_tracks, folder: str, mode: str) -> list[HubTrack]:
    """The store's observed bigWigs as hub tracks, copied or linked into
    ``folder/observed/`` (``mode``: ``copy``, ``link`` or ``none``).

    ``copy`` copies every bigWig source (any path or URL storage reads; unchanged copies of
    the same size are kept). ``link`` uses an ``http(s)``/``ftp`` source by its URL, links
    a local source by a symbolic link (servers and ``aws s3 cp`` follow it; ``rsync``
    needs ``-L``), and leaves out sources no browser can read (``s3://``). bedGraph
    sources are left out (the browser needs bigWig). Each left-out kind is logged once.
    """
    if mode not in OBSERVED_MODES:
        raise InputError(f"--hub-observed must be one of {', '.join(OBSERVED_MODES)}, "
                         f"got {mode!r}.")
    if mode == "none":
        return []
    out: list[HubTrack] = []
    skipped: dict[str, int] = {}
    local_folder = not storage.is_url(folder)
    for t in store_tracks:
        src = t.path
        if not _BIGWIG.search(src.split("?")[0]):
            skipped["not bigWig (bedGraph: convert it with bedGraphToBigWig)"] = \
                skipped.get("not bigWig (bedGraph: convert it with bedGraphToBigWig)", 0) + 1
            continue
        rel = f"{OBSERVED_DIR}/{bigwig_name(t.track_id)}"
        dest = storage.child(folder, OBSERVED_DIR, bigwig_name(t.track_id),
                             what=f"the track id of observed track {t.track_id}")
        note = {"test": "held out", "val": "validation"}.get(t.split, "")
        if mode == "link" and _BROWSER_URL.match(src):
            out.append(HubTrack(t.cell_key, t.assay, "observed", src, note))
            continue
        if mode == "link":
            if storage.is_url(src) or not local_folder:
                why = ("on a URL browsers cannot read (use --hub-observed copy)"
                       if storage.is_url(src) else
                       "local, and the hub is not (use --hub-observed copy)")
                skipped[why] = skipped.get(why, 0) + 1
                continue
            if not os.path.exists(src):
                skipped["missing"] = skipped.get("missing", 0) + 1
                continue
            _symlink(os.path.abspath(src), dest)
        else:
            try:
                _copy(src, dest)
            except FileNotFoundError:
                skipped["missing"] = skipped.get("missing", 0) + 1
                continue
        out.append(HubTrack(t.cell_key, t.assay, "observed", rel, note))
    for why, n in skipped.items():
        log(f"hub: {n} observed track(s) left out: source {why}.")
    return out


def _symlink(target: str, dest: str) -> None:
    """Point ``dest`` at ``target``, replacing what is there in one rename."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.islink(dest) and os.readlink(dest) == target:
        return
    tmp = os.path.join(os.path.dirname(dest), f".tmp-{os.path.basename(dest)}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, dest)


def _copy(src: str, dest: str) -> None:
    """Copy ``src`` to ``dest`` (written aside, then renamed); a copy of the same size
    that is a plain file is kept."""
    fs, p = storage.filesystem(src)
    size = fs.info(p)["size"]
    dfs, d = storage.filesystem(dest)
    if dfs.exists(d) and not (not storage.is_url(dest) and os.path.islink(d)) \
            and dfs.info(d)["size"] == size:
        return
    if not storage.is_url(dest) and os.path.islink(d):
        os.remove(d)  # a link from an earlier --hub-observed link: replace it by a copy
    with storage.local_copy(src) as local:
        storage.upload(local, dest)


# ----------------------------------------------------------------------------- a run


def write_run_hub(run_dir: str, records: list[dict], chroms: list[dict], space: str,
                  genome: str | None = None, observed: str = "none",
                  email: str = DEFAULT_EMAIL, spread: bool = False) -> dict:
    """The hub of an imputation run, in its ``bigwig/`` folder beside the bigWigs.

    Parameters
    ----------
    records : the run's targets (``runfolder.target_records``): the imputed bigWigs.
    chroms : the output store's chromosomes (``name``, ``size``), to recognise the genome.
    genome : UCSC assembly name; None: recognised (see :func:`resolve_genome`).
    observed : ``none``, ``link`` or ``copy`` the observed tracks of the run's store
        (see :func:`observed_tracks`).
    spread : the run has a spread bigWig per target (``edice impute --uncertainty``).

    Returns
    -------
    dict
        ``genome``, ``tracks`` (count by kind), ``hub`` (the URL-able ``hub.txt`` path),
        ``files``.
    """
    genome = resolve_genome(genome, [(c["name"], int(c["size"])) for c in chroms])
    bw_dir = runfolder.bigwig_dir(run_dir)
    tracks = [HubTrack(r["cell_key"], r["assay"], "imputed", bigwig_name(r["track_id"]))
              for r in records]
    if spread:
        tracks += [HubTrack(r["cell_key"], r["assay"], "spread", runfolder.spread_name(r["track_id"]))
                   for r in records]
    if observed != "none":
        tracks += observed_tracks(_store_tracks(run_dir), bw_dir, observed)
    name = "_".join(storage.basename(p) for p in (storage.parent(run_dir), run_dir))
    files = write_hub(bw_dir, tracks, genome, space=space, name=name, email=email,
                      long_label=f"eDICE imputation {run_dir}")
    counts = {k: sum(t.kind == k for t in tracks) for k in KINDS}
    log(f"hub: {files[HUB_TXT]} ({genome}; "
        + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + " tracks)")
    return {"genome": genome, "tracks": counts, "hub": files[HUB_TXT], "files": files}


def _store_tracks(run_dir: str) -> list:
    """The observed tracks of the run's store (read from ``run.json``); none, said in the
    log, when the store cannot be opened (moved, or on a machine without access)."""
    from .store import open_store

    info = runfolder.read(run_dir) or {}
    path = info.get("store")
    if not path:
        log(f"hub: {run_dir} names no store (run.json): no observed tracks.")
        return []
    try:
        return open_store(path).tracks
    except (InputError, OSError) as e:
        log(f"hub: cannot open the run's store {path} ({e}): no observed tracks.")
        return []
