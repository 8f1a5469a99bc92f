"""The synthetic consortium behind ``edice simulate``.

A small genome with chromatin structure, measured by assays in cell types of tissue
groups (and optionally in individuals), written as a consortium would publish it:
bigWigs of -log10 p-values, a manifest (SPEC section 3), ``chrom.sizes``, and apart from
them the held-out truth that imputation must recover.

The model, per 25 bp bin
------------------------
Elements are placed per 1 Mbp region of each chromosome:

- genes (promoter and body), of three kinds: housekeeping (on in every tissue),
  tissue-specific (on in one or two tissue groups) and developmental (on in one tissue
  group, covered by a polycomb domain in the others);
- enhancers, most near a gene and sharing its tissue pattern; *active* (H3K27ac, DNase,
  H3K4me1) or only *primed* (H3K4me1);
- polycomb domains and heterochromatin domains (tissue-specific, or constitutive);
  heterochromatin and polycomb damp active marks underneath them;
- with individuals, *private* enhancers and promoters that exist in one individual only.

A cell type inherits the states of its tissue group, and a share ``cell_flip`` of the
elements departs from them; element strengths vary per cell type. Individuals share the
cell types' states, with their own flips (``individual_flip``) and private elements.
Shared states are what make a missing track predictable from the other assays of the
same cell.

Each cell gets a set of latent channels (TSS, promoter, promoter flank, gene body 3' and
5' weighted, poised promoter, enhancer core, enhancer, primed enhancer flank, polycomb,
heterochromatin) and each assay is a weighted sum of channels smoothed with its own
width (:data:`ASSAY_RESPONSES`): narrow promoter marks (H3K4me3, H3K9ac), promoter and
enhancer marks (H3K27ac, H3K4me1), broad gene-body marks (H3K36me3, H3K79me2), broad
repressive domains (H3K27me3, H3K9me3) and DNase at promoters and enhancers. Assays not
in the table get a seeded random response.

From the noise-free enrichment ``f = 1 + q * g`` (``q`` a per-track quality), the reads of
a bin are ``Poisson(lambda * f * G)``, with ``G`` gamma noise (``overdispersion``) and
``lambda = depth * d * b`` the control: ``d`` a per-track depth and ``b`` a genome-wide
bias (1 kb and 10 kb steps) shared by all tracks. The track value is the Poisson
upper tail ``-log10 P(X >= reads | lambda)``: about Exp(1/ln 10) where nothing is
enriched, large in peaks; always finite and >= 0.

Truth peaks
-----------
The peaks of a held-out track are the runs of bins whose *noise-free* enrichment ``f``
is at least ``peak_fold`` (default 2), adjacent bins merged, in bp clipped to the
chromosome end. With individuals every track's peaks are written (observed ones too), and
its *person-specific* peaks: those bins of its peaks that are peaks in no other
individual's track of the same cell type and assay, in runs of at least 150 bp
(:mod:`edice_dist.personpeaks`); private elements and an individual's flipped elements
make them.

Outputs in OUT_DIR
------------------
::

    chrom.sizes
    manifest.tsv                cell_type assay path split [individual]
    bigwig/<cell_key>-<assay>.bigWig   (or .bedGraph)  observed tracks
    truth/targets.tsv           cell_type assay path peaks [individual person_peaks]
    truth/<cell_key>-<assay>.bigWig    held-out tracks (fixed 25 bp steps)
    truth/peaks/<cell_key>-<assay>.bed  (with individuals: of every track, observed too)
    truth/person_peaks/<cell_key>-<assay>.bed  (with individuals: person-specific peaks)
    truth/observed.tsv          (with individuals) observed tracks with their peaks
    annotation/promoters.bed, gene_bodies.bed, enhancers.bed
    annotation/private_elements.bed    (with individuals: chrom start end individual kind)
    simulation.json             the resolved config

Observed bigWigs are fixed 25 bp steps, or (``variable_fraction``) variable-width
intervals with runs of equal values merged and zero runs left out (ingest reads missing
data as 0); ``source_formats=mixed`` writes some tracks as bedGraph too.

Determinism and streaming
-------------------------
Every random draw comes from a generator seeded by ``(seed, purpose, ...)``: elements by
(chromosome, region), bias by (chromosome, tile), read noise by (track, chromosome,
tile). The same config and seed give the same values whatever ``workers`` is. Work runs
per chromosome in blocks of :data:`BLOCK_BINS` bins, per group of cell keys, so memory
does not grow with genome length (beyond what the bigWig writer keeps for its index).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from . import BIN_SIZE, __version__, config, owned, storage
from ._partial import partial_path
from .errors import InputError
from .genome import Genome, read_chrom_sizes, write_chrom_sizes
from .progress import Progress, log
from .tracks import Track, cell_key, name_problem, track_id, write_manifest

SIM_FILES = frozenset({"bigwig", "truth", "annotation", "chrom.sizes", "manifest.tsv",
                       "simulation.json"})
"""What a simulation folder holds; ``--force`` replaces one only when it holds nothing else."""
SIM_FORMAT = "edice-simulation"
SIM_VERSION = 2
"""Bumped whenever the generator changes what a config produces (2: with individuals,
private elements are on in all of an individual's cells less often, and every track's peaks
and person-specific peaks are written; without individuals nothing changed)."""

REGION_BINS = 40_000
"""Elements are drawn per region of 1 Mbp."""
MAX_EXTENT = 20_000
"""No element reaches further than this many bins outside its region."""
TILE_BINS = 16_000
"""Bias and read noise are drawn per tile (a multiple of the 10 kb bias step)."""
BLOCK_BINS = 4 * TILE_BINS
"""Bins computed at once per cell key; a multiple of TILE_BINS."""
HALO = 128
"""Extra bins on each side of a block so that smoothing needs no neighbours."""
MAX_GROUP_TRACKS = 48
"""Tracks written by one pass; bounds open files and the bigWig writers' memory."""

# Latent channels of a cell, in bins.
TSS, PROM, FLANK, BODY3, BODY5, POISED, ENH_C, ENH, ENH_F, PC, HET = range(11)
CHANNELS = ("tss", "promoter", "promoter_flank", "body_3prime", "body_5prime", "poised",
            "enhancer_core", "enhancer", "enhancer_flank", "polycomb", "heterochromatin")
_ACTIVE = [TSS, PROM, FLANK, BODY3, BODY5, ENH_C, ENH, ENH_F]

ASSAY_RESPONSES: dict[str, tuple[dict[int, float], int]] = {
    # assay: ({channel: fold-enrichment weight}, smoothing width in bins)
    "H3K4me3": ({TSS: 10.0, PROM: 16.0, FLANK: 1.0, POISED: 4.0, ENH: 1.0}, 7),
    "H3K9ac": ({TSS: 6.0, PROM: 12.0, FLANK: 3.0, ENH: 3.0}, 9),
    "H3K27ac": ({TSS: 3.0, PROM: 7.0, FLANK: 6.0, ENH_C: 2.0, ENH: 9.0, ENH_F: 1.0}, 11),
    "H3K4me1": ({FLANK: 6.0, ENH: 3.0, ENH_F: 5.0, BODY5: 0.4, POISED: 1.0}, 15),
    "H3K4me2": ({PROM: 8.0, FLANK: 6.0, ENH: 6.0, ENH_F: 2.0}, 11),
    "H2A.Z": ({TSS: 5.0, PROM: 6.0, ENH_C: 3.0, ENH: 2.0, POISED: 3.0}, 9),
    "H3K36me3": ({BODY3: 3.0}, 31),
    "H3K79me2": ({BODY5: 4.0, FLANK: 1.0}, 25),
    "H4K20me1": ({BODY3: 1.5, BODY5: 1.5}, 31),
    "H3K27me3": ({PC: 2.2, POISED: 2.0, HET: 0.3}, 41),
    "H3K9me3": ({HET: 2.8}, 41),
    "DNase": ({TSS: 14.0, PROM: 1.5, ENH_C: 9.0, ENH: 1.0}, 3),
}

TISSUES = ("blood", "brain", "liver", "muscle", "gut", "skin", "lung", "heart", "kidney", "bone")

# Purposes of the seeded generators.
_PLAN, _REGION, _BIAS, _NOISE, _ASSAY = range(1, 6)

_LAMBDA_RATIO = 1.02  # control lambdas are rounded to a 2 % log grid ...
_LAMBDA_SPAN = 100.0  # ... from depth / 10 to depth * 10


@dataclass
class SimConfig:
    """Settings of a synthetic consortium. Every field can be set with ``--KEY=VALUE``."""

    seed: int = 0  # master seed: the same config and seed give identical values
    chrom_sizes: str = "chr1:1200007,chr2:800011,chr3:500009"  # name:bp,... or a chrom.sizes file
    genome_bp: int = 0  # > 0: n_chroms chromosomes of about this many bp in all (benchmarks)
    n_chroms: int = 3  # chromosomes made when genome_bp > 0
    n_cell_types: int = 12  # cell types, shared by all individuals
    n_tissues: int = 3  # tissue groups; their cell types share gene and enhancer states
    assays: str = "H3K4me3,H3K27ac,H3K4me1,H3K36me3,H3K27me3,H3K9me3,DNase,H3K9ac"  # comma list
    core_assays: str = "H3K4me3,H3K4me1,H3K36me3,H3K27me3,H3K9me3"  # measured in most cells
    core_fraction: float = 0.9  # chance that a core assay is measured in a cell
    other_fraction: float = 0.4  # chance that any other assay is measured in a cell
    n_test: int = 8  # measured tracks held out as the truth
    individuals: int = 0  # 0: cell types only; K > 0: cells are cell_type@individual
    individual_cell_fraction: float = 0.6  # chance that an individual has a given cell type
    individual_flip: float = 0.03  # share of shared elements whose state differs per individual
    private_rate: float = 10.0  # private elements per Mbp per individual
    gene_density: float = 25.0  # genes per Mbp
    enhancer_density: float = 100.0  # enhancers per Mbp (union over tissues)
    polycomb_density: float = 2.0  # polycomb domains per Mbp besides those on silent genes
    heterochromatin_density: float = 2.0  # heterochromatin domains per Mbp
    cell_flip: float = 0.08  # share of elements whose state in a cell departs from its tissue
    depth: float = 4.0  # mean background reads per 25 bp bin
    lambda_margin: float = 1.3  # p-value lambda / mean background, as MACS's local lambda (a max)
    overdispersion: float = 0.05  # variance of the gamma noise on the read mean
    peak_fold: float = 2.0  # truth peaks: bins whose noise-free enrichment is at least this
    variable_fraction: float = 0.25  # share of observed tracks written as variable-width runs
    source_formats: str = "bigwig"  # bigwig; mixed (some bedGraph too); or bedgraph
    zoom_levels: int = 10  # bigWig zoom levels; 0 writes ~2x faster (readers of 25 bp bins skip them)
    workers: int = 1  # processes writing tracks (the values do not depend on it)
    force: bool = False  # replace an OUT_DIR that holds a simulation of another config

    def __post_init__(self):
        self._validate()

    # ---- parsing -------------------------------------------------------------------
    @classmethod
    def from_overrides(cls, d: dict[str, str]) -> SimConfig:
        """A config from ``{key: string}`` (``--KEY=VALUE`` pairs), strings converted to
        the fields' types.

        Raises
        ------
        InputError
            For an unknown key (the message lists the valid ones) or a value that does not
            convert.
        """
        return config.load(cls, config.Source(d), noun=("simulate setting", "settings"))

    def _validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise InputError(f"Simulate setting {key}={getattr(self, key)!r}: {what}.")

        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.n_cell_types >= 2, "n_cell_types", "must be at least 2")
        need(1 <= self.n_tissues <= self.n_cell_types, "n_tissues",
             "must be between 1 and n_cell_types")
        need(self.n_test >= 0, "n_test", "must be >= 0")
        need(self.individuals >= 0, "individuals", "must be >= 0")
        need(self.individuals != 1, "individuals",
             "must be 0 or at least 2 (held-out tracks of an individual are compared with "
             "the same track of the others)")
        for key in ("core_fraction", "other_fraction", "individual_cell_fraction",
                    "individual_flip", "cell_flip", "variable_fraction"):
            need(0.0 <= getattr(self, key) <= 1.0, key, "must be between 0 and 1")
        for key in ("private_rate", "gene_density", "enhancer_density", "polycomb_density",
                    "heterochromatin_density", "overdispersion"):
            need(getattr(self, key) >= 0.0, key, "must be >= 0")
        need(0.01 <= self.depth <= 100.0, "depth", "must be between 0.01 and 100")
        need(1.0 <= self.lambda_margin <= 3.0, "lambda_margin", "must be between 1 and 3")
        need(self.peak_fold > 1.0, "peak_fold", "must be > 1")
        need(self.source_formats in ("bigwig", "mixed", "bedgraph"), "source_formats",
             "must be bigwig, mixed or bedgraph")
        need(self.workers >= 1, "workers", "must be >= 1")
        need(0 <= self.zoom_levels <= 10, "zoom_levels", "must be between 0 and 10")
        need(self.genome_bp >= 0, "genome_bp", "must be >= 0")
        need(self.n_chroms >= 1, "n_chroms", "must be >= 1")
        if self.genome_bp:
            need(self.genome_bp // self.n_chroms >= 10_000, "genome_bp",
                 "must give every chromosome at least 10 kb")
        names = self.assay_list
        need(len(names) >= 2, "assays", "needs at least two assays")
        need(len(set(names)) == len(names), "assays", "lists an assay twice")
        for a in names:
            need(name_problem(a) is None, "assays", f"assay {a!r} {name_problem(a)}")
        if ":" not in self.chrom_sizes and self.genome_bp == 0:
            g = read_chrom_sizes(self.chrom_sizes)  # a file: record the sizes themselves
            self.chrom_sizes = ",".join(f"{c}:{s}" for c, s in zip(g.chroms, g.sizes, strict=True))
        self.genome()

    # ---- derived -------------------------------------------------------------------
    @property
    def assay_list(self) -> list[str]:
        return [a.strip() for a in self.assays.split(",") if a.strip()]

    @property
    def core_list(self) -> list[str]:
        return [a.strip() for a in self.core_assays.split(",") if a.strip()]

    def genome(self) -> Genome:
        """The simulated genome: ``genome_bp`` split over ``n_chroms`` chromosomes of falling
        size, or ``chrom_sizes``. Sizes made by ``genome_bp`` end in a partial bin."""
        if self.genome_bp:
            w = 1.0 - 0.5 * np.arange(self.n_chroms) / max(self.n_chroms - 1, 1)
            sizes = np.floor(self.genome_bp * w / w.sum()).astype(np.int64)
            sizes = sizes - sizes % BIN_SIZE + 13
            return Genome(tuple(f"chr{i + 1}" for i in range(self.n_chroms)),
                          tuple(int(s) for s in sizes))
        names, sizes = [], []
        for item in self.chrom_sizes.split(","):
            item = item.strip()
            if not item:
                continue
            name, _, size = item.rpartition(":")
            try:
                size_i = int(size)
            except ValueError:
                size_i = 0
            if not name or size_i <= 0 or name in names:
                raise InputError(
                    f"Simulate setting chrom_sizes: {item!r} is not a new name:size pair with "
                    "a positive size. Example: chr1:1200007,chr2:800011, or give a "
                    "chrom.sizes file."
                )
            names.append(name)
            sizes.append(size_i)
        if not names:
            raise InputError("Simulate setting chrom_sizes lists no chromosomes.")
        return Genome(tuple(names), tuple(sizes))

    def identity(self) -> dict:
        """The settings that decide the output (all but ``workers`` and ``force``)."""
        d = asdict(self)
        d.pop("workers")
        d.pop("force")
        return d


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _count(rng: np.random.Generator, mean: float) -> int:
    """An element count of the given mean that varies as little as possible (floor or
    ceiling), so that small genomes still get every kind of element."""
    return int(math.floor(mean) + (rng.random() < mean - math.floor(mean)))


# ---- the study design ------------------------------------------------------------------


@dataclass(frozen=True)
class SimTrack:
    """One measured (cell key, assay) pair: observed, or held out as truth."""

    cell_type: str
    assay: str
    individual: str
    key: int  # index into Plan.keys
    assay_index: int
    grid_index: int  # key * n_assays + assay_index: seeds the track's noise
    held_out: bool
    encoding: str  # fixed | variable | bedgraph
    depth: float  # multiplies SimConfig.depth
    quality: float  # multiplies the enrichment

    @property
    def cell_key(self) -> str:
        return cell_key(self.cell_type, self.individual)

    @property
    def track_id(self) -> str:
        return track_id(self.cell_key, self.assay)

    @property
    def rel_path(self) -> str:
        """Path under OUT_DIR."""
        if self.held_out:
            return f"truth/{self.track_id}.bigWig"
        ext = ".bedGraph" if self.encoding == "bedgraph" else ".bigWig"
        return f"bigwig/{self.track_id}{ext}"


@dataclass
class Plan:
    """Who is measured: tissues, cell types, individuals, cell keys and tracks."""

    assays: list[str]
    tissues: list[str]
    cell_types: list[str]
    cell_tissue: np.ndarray  # (n_cell_types,) tissue index
    individuals: list[str]
    keys: list[tuple[int, int]]  # (cell type index, individual index or -1)
    tracks: list[SimTrack]

    @property
    def key_celltype(self) -> np.ndarray:
        return np.array([k[0] for k in self.keys], dtype=np.int64)

    @property
    def key_individual(self) -> np.ndarray:
        return np.array([k[1] for k in self.keys], dtype=np.int64)

    @property
    def observed(self) -> list[SimTrack]:
        return [t for t in self.tracks if not t.held_out]

    @property
    def held_out(self) -> list[SimTrack]:
        return [t for t in self.tracks if t.held_out]


def make_plan(cfg: SimConfig) -> Plan:
    """Draw the study design: which (cell key, assay) pairs are measured, which of those
    are held out, and how each observed track is encoded.

    Core assays are measured with ``core_fraction``, others with ``other_fraction``; then
    pairs are added until every cell key has >= 3 measured tracks and every assay >= 3
    cell keys (where possible), so that after holding out ``n_test`` tracks every cell key
    keeps >= 2 observed tracks and every assay >= 2 observed cell keys. Held-out tracks
    are picked one assay at a time in a shuffled order; with individuals, a held-out
    (cell type, assay) is also observed in another individual (for TrackAVG).

    Raises
    ------
    InputError
        When ``n_test`` tracks cannot be held out under those rules.
    """
    rng = _rng(cfg.seed, _PLAN)
    assays = cfg.assay_list
    na = len(assays)
    nt, nct = cfg.n_tissues, cfg.n_cell_types
    tissues = [TISSUES[t] if t < len(TISSUES) else f"tissue{t + 1:02d}" for t in range(nt)]
    cell_tissue = (np.arange(nct) * nt) // nct
    within = [int((cell_tissue[:c] == cell_tissue[c]).sum()) for c in range(nct)]
    cell_types = [f"{tissues[cell_tissue[c]]}_{within[c] + 1:02d}" for c in range(nct)]

    individuals = [f"ind{i + 1:02d}" for i in range(cfg.individuals)]
    if individuals:
        present = rng.random((len(individuals), nct)) < cfg.individual_cell_fraction
        for i in range(len(individuals)):
            while present[i].sum() < 2:
                present[i, rng.integers(nct)] = True
        keys = [(c, i) for i in range(len(individuals)) for c in range(nct) if present[i, c]]
    else:
        keys = [(c, -1) for c in range(nct)]
    nk = len(keys)

    core = np.array([a in cfg.core_list for a in assays])
    p = np.where(core, cfg.core_fraction, cfg.other_fraction)
    measured = rng.random((nk, na)) < p[None, :]
    min_cell, min_assay = min(3, na), min(3, nk)
    for k in range(nk):
        while measured[k].sum() < min_cell:
            free = np.flatnonzero(~measured[k])
            pref = free[core[free]] if core[free].any() else free
            measured[k, rng.choice(pref)] = True
    for a in range(na):
        while measured[:, a].sum() < min_assay:
            measured[rng.choice(np.flatnonzero(~measured[:, a])), a] = True

    held = np.zeros_like(measured)
    key_ct = np.array([k[0] for k in keys])
    obs_per_key = measured.sum(axis=1)  # observed (measured, not held) tracks per cell key

    def holdable(a: int) -> np.ndarray:
        """Cell keys whose track of assay ``a`` may be held out, ascending: observed, its
        cell keeps >= 2 others and the assay >= 2 other cells; with individuals, the same
        cell type and assay observed in another individual (keys are unique per (cell
        type, individual), so "another" is any other key of that cell type). Vectorised:
        a per-key loop made a 1,000-track design cost minutes."""
        obs_a = measured[:, a] & ~held[:, a]
        ok = obs_a & (obs_per_key >= 3)
        if obs_a.sum() < 3:
            return np.flatnonzero(np.zeros(nk, bool))
        if individuals:
            per_ct = np.bincount(key_ct[obs_a], minlength=nct)
            ok &= per_ct[key_ct] - obs_a > 0
        return np.flatnonzero(ok)

    n_held = 0
    while n_held < cfg.n_test:
        picked = False
        for a in rng.permutation(na):
            if n_held >= cfg.n_test:
                break
            cands = holdable(a)
            if len(cands):
                k = cands[rng.integers(len(cands))]
                held[k, a] = True
                obs_per_key[k] -= 1
                n_held += 1
                picked = True
        if not picked:
            raise InputError(
                f"Only {n_held} of n_test={cfg.n_test} tracks can be held out while every cell "
                "keeps 2 observed tracks and every assay 2 observed cells"
                + (" and the same track is observed in another individual" if individuals else "")
                + ". Lower n_test, or raise core_fraction / other_fraction / n_cell_types."
            )

    # Per-pair draws over the whole grid from their own generator, so that they do not
    # depend on the design above.
    rng = _rng(cfg.seed, _PLAN, 1)
    u = rng.random((nk, na))
    depth = np.clip(np.exp(rng.normal(0.0, 0.25, (nk, na))), 0.5, 2.0)
    quality = np.clip(np.exp(rng.normal(0.0, 0.2, (nk, na))), 0.5, 2.0)
    bedgraph_share = {"bigwig": 0.0, "mixed": 0.15, "bedgraph": 1.0}[cfg.source_formats]
    tracks = []
    for k, (c, i) in enumerate(keys):
        for a in range(na):
            if not measured[k, a]:
                continue
            if u[k, a] < bedgraph_share:
                enc = "bedgraph"
            elif u[k, a] < bedgraph_share + cfg.variable_fraction:
                enc = "variable"
            else:
                enc = "fixed"
            tracks.append(SimTrack(
                cell_types[c], assays[a], individuals[i] if i >= 0 else "", k, a, k * na + a,
                bool(held[k, a]), "fixed" if held[k, a] else enc,
                float(depth[k, a]), float(quality[k, a])))
    return Plan(assays, tissues, cell_types, cell_tissue, individuals, keys, tracks)


def assay_response(cfg: SimConfig, assay: str) -> tuple[np.ndarray, int]:
    """Channel weights, shape (n_channels,), and smoothing width (odd, bins) of an assay.
    Assays outside :data:`ASSAY_RESPONSES` get two or three channels with seeded weights."""
    if assay in ASSAY_RESPONSES:
        weights, width = ASSAY_RESPONSES[assay]
    else:
        rng = _rng(cfg.seed, _ASSAY, cfg.assay_list.index(assay))
        chans = rng.choice(len(CHANNELS), size=int(rng.integers(2, 4)), replace=False)
        weights = {int(c): float(rng.uniform(2.0, 10.0)) for c in chans}
        width = int(rng.choice([3, 9, 21, 41]))
    w = np.zeros(len(CHANNELS))
    for c, v in weights.items():
        w[c] = v
    return w, width


# ---- elements --------------------------------------------------------------------------


class _Landscape:
    """Elements of one chromosome, drawn per region and cached while blocks pass by."""

    def __init__(self, cfg: SimConfig, plan: Plan, chrom_index: int, n_bins: int):
        self.cfg, self.plan, self.ci, self.nb = cfg, plan, chrom_index, n_bins
        self.n_regions = math.ceil(n_bins / REGION_BINS)
        self.cache: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        self.key_ct = plan.key_celltype
        self.key_ind = plan.key_individual
        self.key_tissue = plan.cell_tissue[self.key_ct]

    def window(self, lo: int, hi: int) -> dict[str, dict[str, np.ndarray]]:
        """Every element that may touch bins ``[lo, hi)``: ``{kind: {field: array}}``."""
        r0 = max(0, (lo - MAX_EXTENT) // REGION_BINS)
        r1 = min(self.n_regions - 1, (hi + MAX_EXTENT) // REGION_BINS)
        for r in [r for r in self.cache if r < r0]:
            del self.cache[r]
        parts = []
        for r in range(r0, r1 + 1):
            if r not in self.cache:
                self.cache[r] = self._region(r)
            parts.append(self.cache[r])
        return {kind: {f: np.concatenate([p[kind][f] for p in parts]) for f in parts[0][kind]}
                for kind in parts[0]}

    def _states(self, rng, on_tissue: np.ndarray, flip: float) -> np.ndarray:
        """(n, n_keys) on/off: the tissue's state, flipped per cell type and individual."""
        on = on_tissue[:, self.plan.cell_tissue]
        on = on ^ (rng.random(on.shape) < flip)
        on = on[:, self.key_ct]
        if self.plan.individuals:
            ind_flip = rng.random((len(on), len(self.plan.individuals))) < self.cfg.individual_flip
            on = on ^ ind_flip[:, self.key_ind]
        return on

    def _levels(self, rng, base: np.ndarray) -> np.ndarray:
        """(n, n_keys) strengths: a per-element base, varied per cell type and per key."""
        per_ct = np.exp(rng.normal(0.0, 0.3, (len(base), len(self.plan.cell_types))))
        per_key = np.exp(rng.normal(0.0, 0.1, (len(base), len(self.plan.keys))))
        return (base[:, None] * per_ct[:, self.key_ct] * per_key).astype(np.float32)

    def _tissue_pattern(self, rng, n: int, p_two: float, p_all: float) -> np.ndarray:
        nt = len(self.plan.tissues)
        on = np.zeros((n, nt), dtype=bool)
        on[np.arange(n), rng.integers(0, nt, n)] = True
        u = rng.random(n)
        second = rng.integers(0, nt, n)
        two = u < p_two
        on[np.flatnonzero(two), second[two]] = True
        on[u > 1.0 - p_all] = True
        return on

    def _region(self, r: int) -> dict[str, dict[str, np.ndarray]]:
        cfg, plan = self.cfg, self.plan
        rng = _rng(cfg.seed, _REGION, self.ci, r)
        lo, hi = r * REGION_BINS, min(self.nb, (r + 1) * REGION_BINS)
        mbp = (hi - lo) * BIN_SIZE / 1e6
        nk = len(plan.keys)

        # genes: 0 housekeeping, 1 tissue-specific, 2 developmental (polycomb when off)
        n = _count(rng, cfg.gene_density * mbp)
        tss = rng.integers(lo, hi, n)
        strand = np.where(rng.random(n) < 0.5, -1, 1)
        length = np.clip(np.exp(rng.normal(math.log(600), 0.9, n)), 60, 8000).astype(np.int64)
        tes = tss + strand * length
        cls = rng.choice(3, size=n, p=[0.35, 0.5, 0.15])
        gene_t = self._tissue_pattern(rng, n, 0.3, 0.0)
        gene_t[cls == 0] = True
        gene_t[cls == 2] &= np.cumsum(gene_t[cls == 2], axis=1) == 1  # one tissue only
        on = self._states(rng, gene_t, cfg.cell_flip)
        act = on * self._levels(rng, np.exp(rng.normal(0.0, 0.5, n)))
        pc_amp = (~on & (cls == 2)[:, None]) * np.exp(rng.normal(0.0, 0.2, (n, nk)))
        pad = rng.integers(120, 600, (2, n))
        genes = {"tss": tss, "tes": tes, "strand": strand, "act": act,
                 "pc": pc_amp.astype(np.float32),
                 "pc_lo": np.minimum(tss, tes) - pad[0], "pc_hi": np.maximum(tss, tes) + pad[1],
                 "owner": np.full(n, -1), "region": np.full(n, r), "index": np.arange(n)}
        n_genes = n

        # enhancers: most near a gene of the region, sharing its tissue pattern
        n = _count(rng, cfg.enhancer_density * mbp)
        linked = (rng.random(n) < 0.6) & (n_genes > 0)
        gi = rng.integers(0, max(n_genes, 1), n)
        offset = np.where(rng.random(n) < 0.5, -1, 1) * rng.integers(120, 2000, n)
        free_pos = rng.integers(lo, hi, n)
        center = np.where(linked, tss[gi] + offset if n_genes else free_pos, free_pos)
        on_t = self._tissue_pattern(rng, n, 0.25, 0.15)
        if n_genes:
            # enhancers of housekeeping genes keep their own (tissue-specific) pattern
            copy = linked & (cls[gi] != 0)
            on_t[copy] = gene_t[gi[copy]]
        on = self._states(rng, on_t, cfg.cell_flip)
        active = on & (rng.random((n, nk)) < 0.85)
        primed = on | (rng.random((n, nk)) < 0.08)
        level = self._levels(rng, np.exp(rng.normal(0.0, 0.4, n)))
        enh = {"center": center, "act": active * level, "me1": primed * level,
               "owner": np.full(n, -1), "region": np.full(n, r), "index": np.arange(n)}

        # polycomb domains (besides those over silent developmental genes)
        n = _count(rng, cfg.polycomb_density * mbp)
        start = rng.integers(lo, hi, n)
        length = np.clip(np.exp(rng.normal(math.log(600), 0.6, n)), 120, 4000).astype(np.int64)
        on = self._states(rng, rng.random((n, len(plan.tissues))) < 0.5, cfg.cell_flip)
        pcd = {"start": start, "end": start + length,
               "act": (on * np.exp(rng.normal(0.0, 0.2, (n, nk)))).astype(np.float32)}

        # heterochromatin: 30 % constitutive, the rest present per tissue
        n = _count(rng, cfg.heterochromatin_density * mbp)
        start = rng.integers(lo, hi, n)
        length = np.clip(np.exp(rng.normal(math.log(2400), 0.7, n)), 400, 16000).astype(np.int64)
        on_t = (rng.random(n) < 0.3)[:, None] | (rng.random((n, len(plan.tissues))) < 0.5)
        on = self._states(rng, on_t, cfg.cell_flip / 2)
        het = {"start": start, "end": start + length,
               "act": (on * np.exp(rng.normal(0.0, 0.15, (n, nk)))).astype(np.float32)}

        if plan.individuals:
            genes, enh = self._private(rng, lo, hi, mbp, r, genes, enh)
        return {"genes": genes, "enh": enh, "pcd": pcd, "het": het}

    def _private(self, rng, lo, hi, mbp, r, genes, enh):
        """Elements of one individual: 30 % promoters of short genes, 70 % enhancers; on in
        all of the individual's cells (30 % of them) or, most, in one tissue group's cells
        (as a person's variants act in some tissues and not others)."""
        cfg, plan = self.cfg, self.plan
        counts = [_count(rng, cfg.private_rate * mbp) for _ in plan.individuals]
        owner = np.repeat(np.arange(len(plan.individuals)), counts)
        n = len(owner)
        pos = rng.integers(lo, hi, n)
        is_prom = rng.random(n) < 0.3
        in_all = rng.random(n) < 0.3
        tissue = rng.integers(0, len(plan.tissues), n)
        on = (self.key_ind[None, :] == owner[:, None]) & (
            in_all[:, None] | (self.key_tissue[None, :] == tissue[:, None]))
        level = on * self._levels(rng, np.exp(rng.normal(0.3, 0.4, n)))
        strand = np.where(rng.random(n) < 0.5, -1, 1)
        length = rng.integers(80, 400, n)
        p, e = is_prom, ~is_prom
        idx = np.arange(n)
        genes = {k: np.concatenate([genes[k], v]) for k, v in {
            "tss": pos[p], "tes": pos[p] + strand[p] * length[p], "strand": strand[p],
            "act": level[p], "pc": np.zeros((p.sum(), len(plan.keys)), np.float32),
            "pc_lo": pos[p], "pc_hi": pos[p], "owner": owner[p],
            "region": np.full(p.sum(), r), "index": idx[p]}.items()}
        enh = {k: np.concatenate([enh[k], v]) for k, v in {
            "center": pos[e], "act": level[e], "me1": level[e], "owner": owner[e],
            "region": np.full(e.sum(), r), "index": idx[e]}.items()}
        return genes, enh


def _channels(feats: dict, key: int, w0: int, w1: int, nb: int) -> np.ndarray:
    """Latent channels of cell key ``key`` over bins ``[w0, w1)``, shape (n_channels, w1 - w0);
    zero outside ``[0, nb)``."""
    n = w1 - w0
    a, b = max(0, w0), min(nb, w1)
    D = np.zeros((len(CHANNELS), n + 1))

    def box(ch, lo, hi, amp):
        lo = np.clip(lo, a, b) - w0
        hi = np.clip(hi, a, b) - w0
        keep = (hi > lo) & (amp != 0)
        if keep.any():
            D[ch] += np.bincount(lo[keep], amp[keep], minlength=n + 1)
            D[ch] -= np.bincount(hi[keep], amp[keep], minlength=n + 1)

    g = feats["genes"]
    act, tss = g["act"][:, key].astype(np.float64), g["tss"]
    box(TSS, tss - 8, tss + 9, act)
    box(PROM, tss - 40, tss + 41, act)
    box(FLANK, tss - 120, tss + 121, act)
    box(FLANK, tss - 40, tss + 41, -act)
    s, e = np.minimum(tss, g["tes"]), np.maximum(tss, g["tes"])
    cuts = [s, s + (e - s) // 3, s + 2 * (e - s) // 3, e]
    plus = g["strand"] > 0
    for j, (w3, w5) in enumerate([(0.5, 1.0), (0.8, 0.6), (1.0, 0.3)]):
        lo_, hi_ = cuts[j], cuts[j + 1]
        box(BODY3, lo_, hi_, act * np.where(plus, w3, 1.5 - w3))
        box(BODY5, lo_, hi_, act * np.where(plus, w5, 1.3 - w5))
    pc = g["pc"][:, key].astype(np.float64)
    box(POISED, tss - 40, tss + 41, pc)
    box(PC, g["pc_lo"], g["pc_hi"], pc)
    en = feats["enh"]
    c, ea = en["center"], en["act"][:, key].astype(np.float64)
    box(ENH_C, c - 8, c + 9, ea)
    box(ENH, c - 40, c + 41, ea)
    box(ENH_F, c - 100, c + 101, en["me1"][:, key].astype(np.float64))
    for kind, ch in (("pcd", PC), ("het", HET)):
        d = feats[kind]
        box(ch, d["start"], d["end"], d["act"][:, key].astype(np.float64))
    C = np.cumsum(D, axis=1)[:, :-1]
    np.maximum(C, 0.0, out=C)  # cumsum rounding
    damp = np.clip(1.0 - 0.9 * C[HET] - 0.6 * C[PC], 0.05, 1.0)
    C[_ACTIVE] *= damp
    return C


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Two passes of a centred box filter of ``width`` (odd) bins: a triangular kernel."""
    if width <= 1:
        return x
    h = width // 2
    for _ in range(2):
        c = np.concatenate([[0.0], np.cumsum(np.concatenate([np.zeros(h), x, np.zeros(h)]))])
        x = (c[width:] - c[:-width]) / width
    return x


# ---- -log10 p ------------------------------------------------------------------------


def neglog10_poisson_sf(lams: np.ndarray, kmax: int) -> np.ndarray:
    """``-log10 P(X >= k)`` for ``X ~ Poisson(lam)``, ``k = 0 .. kmax``.

    Computed in log space (no underflow however small the tail).

    Parameters
    ----------
    lams : np.ndarray, shape (L,)
        Positive means.
    kmax : int

    Returns
    -------
    np.ndarray, shape (L, kmax + 1), float32, >= 0
    """
    lams = np.asarray(lams, dtype=np.float64)
    if np.any(lams <= 0):
        raise ValueError("lams must be positive")
    # terms beyond kmax + pad add nothing visible once kmax >= 4 * lam
    k2 = kmax + 1 + 1024
    k = np.arange(k2, dtype=np.float64)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, k2, dtype=np.float64)))])
    out = np.empty((len(lams), kmax + 1), dtype=np.float32)
    for i in range(0, len(lams), 32):
        lam = lams[i:i + 32, None]
        logpmf = -lam + k[None, :] * np.log(lam) - logfact[None, :]
        logsf = np.logaddexp.accumulate(logpmf[:, ::-1], axis=1)[:, ::-1]
        out[i:i + 32] = np.maximum(-logsf[:, :kmax + 1] / math.log(10.0), 0.0)
    out[:, 0] = 0.0
    return out


class _PvalTable:
    """Control lambdas on a log grid and their -log10 p per read count."""

    def __init__(self, depth: float):
        self.lo = depth / math.sqrt(_LAMBDA_SPAN)
        self.step = math.log(_LAMBDA_RATIO)
        n = int(math.ceil(math.log(_LAMBDA_SPAN) / self.step)) + 1
        self.lams = self.lo * np.exp(self.step * np.arange(n))
        self.kmax = max(4095, int(self.lams[-1] * 64))
        self.table = neglog10_poisson_sf(self.lams, self.kmax)

    def index(self, lam: np.ndarray) -> np.ndarray:
        i = np.rint(np.log(lam / self.lo) / self.step)
        return np.clip(i, 0, len(self.lams) - 1).astype(np.int64)


def _bias(seed: int, ci: int, b0: int, b1: int) -> np.ndarray:
    """Genome-wide control bias of bins ``[b0, b1)`` (tile aligned), mean about 1: steps
    of 1 kb and 10 kb, like a local lambda."""
    out = []
    for t in range(b0 // TILE_BINS, (b1 - 1) // TILE_BINS + 1):
        rng = _rng(seed, _BIAS, ci, t)
        z1 = np.repeat(rng.standard_normal(TILE_BINS // 40), 40)
        z2 = np.repeat(rng.standard_normal(TILE_BINS // 400), 400)
        out.append(np.exp(0.25 * z1 + 0.2 * z2 - (0.25**2 + 0.2**2) / 2))
    first = (b0 // TILE_BINS) * TILE_BINS
    return np.concatenate(out)[b0 - first:b1 - first]


# ---- writers -------------------------------------------------------------------------


def _runs(values: np.ndarray):
    """Start and stop indices of runs of equal values, shape (n_runs,) each."""
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(values)]])
    return starts, stops


class _TrackOut:
    """Writes one track block by block, in order, never past a chromosome's end."""

    def __init__(self, path: str, encoding: str, genome: Genome, zooms: int = 10):
        self.encoding = encoding
        if encoding == "bedgraph":
            self.f = open(path, "w")  # noqa: SIM115 - closed in close()
        else:
            import pyBigWig

            self.f = pyBigWig.open(path, "w")
            # the header must come before any entry (pyBigWig segfaults otherwise)
            self.f.addHeader(list(zip(genome.chroms, genome.sizes, strict=True)), maxZooms=zooms)

    def write(self, chrom: str, size: int, b0: int, values: np.ndarray) -> None:
        """``values``, shape (n,), float32: bins ``[b0, b0 + n)`` of ``chrom``."""
        n = len(values)
        last_partial = (b0 + n) * BIN_SIZE > size
        if self.encoding == "fixed":
            full = n - 1 if last_partial else n
            if full > 0:
                self.f.addEntries(chrom, b0 * BIN_SIZE, values=values[:full],
                                  span=BIN_SIZE, step=BIN_SIZE)
            if last_partial:
                self.f.addEntries([chrom], [(b0 + n - 1) * BIN_SIZE], ends=[size],
                                  values=values[-1:])
            return
        starts, stops = _runs(values)
        keep = values[starts] != 0  # missing data reads as 0
        starts, stops = (starts[keep] + b0) * BIN_SIZE, (stops[keep] + b0) * BIN_SIZE
        vals = values[starts // BIN_SIZE - b0] if len(starts) else values[:0]
        stops = np.minimum(stops, size)
        if not len(starts):
            return
        if self.encoding == "variable":
            self.f.addEntries([chrom] * len(starts), starts, ends=stops, values=vals)
        else:
            self.f.write("".join(f"{chrom}\t{s}\t{e}\t{v:.6g}\n"
                                 for s, e, v in zip(starts.tolist(), stops.tolist(),
                                                    vals.tolist(), strict=True)))

    def close(self) -> None:
        self.f.close()


class _PeakOut:
    """Merged peak intervals of one track, as BED, carried across blocks."""

    def __init__(self, path: str):
        self.f = open(path, "w")  # noqa: SIM115 - closed in close()
        self.chrom, self.size, self.run = None, 0, None

    def write(self, chrom: str, size: int, b0: int, mask: np.ndarray) -> None:
        if chrom != self.chrom:
            self._flush()
            self.chrom, self.size = chrom, size
        m = np.concatenate([[False], mask, [False]])
        d = np.flatnonzero(m[1:] != m[:-1])
        starts, stops = d[0::2] + b0, d[1::2] + b0
        for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
            if self.run is not None and self.run[1] == s:
                self.run = (self.run[0], e)
            else:
                self._flush()
                self.run = (s, e)
        if self.run is not None and self.run[1] < b0 + len(mask):
            self._flush()

    def _flush(self) -> None:
        if self.run is not None:
            s, e = self.run
            self.f.write(f"{self.chrom}\t{s * BIN_SIZE}\t{min(e * BIN_SIZE, self.size)}\n")
            self.run = None

    def close(self) -> None:
        self._flush()
        self.f.close()


# ---- the work ------------------------------------------------------------------------


def _write_group(cfg_json: dict, root: str, keys: list[int]) -> int:
    """Write every track of the cell keys ``keys`` under ``root``; returns the bins written."""
    cfg = SimConfig(**cfg_json)
    plan = make_plan(cfg)
    genome = cfg.genome()
    tracks = [t for t in plan.tracks if t.key in set(keys)]
    if not tracks:
        return 0
    table = _PvalTable(cfg.depth * cfg.lambda_margin)
    resp = {a: assay_response(cfg, a) for a in plan.assays}
    outs = {t.grid_index: _TrackOut(os.path.join(root, t.rel_path), t.encoding, genome,
                                            cfg.zoom_levels)
            for t in tracks}
    peaks = {t.grid_index: _PeakOut(os.path.join(root, "truth", "peaks", t.track_id + ".bed"))
             for t in tracks if t.held_out or plan.individuals}
    shape = 1.0 / cfg.overdispersion if cfg.overdispersion > 0 else 0.0
    written = 0
    try:
        for ci, chrom in enumerate(genome.chroms):
            nb, size = genome.n_bins(chrom), genome.size[chrom]
            land = _Landscape(cfg, plan, ci, nb)
            for b0 in range(0, nb, BLOCK_BINS):
                b1 = min(nb, b0 + BLOCK_BINS)
                w0, w1 = b0 - HALO, b1 + HALO
                feats = land.window(w0, w1)
                bias = _bias(cfg.seed, ci, b0, b1)
                for key in keys:
                    key_tracks = [t for t in tracks if t.key == key]
                    if not key_tracks:
                        continue
                    C = _channels(feats, key, w0, w1, nb)
                    for t in key_tracks:
                        w, width = resp[t.assay]
                        g = _smooth(w[w > 0] @ C[w > 0], width)[HALO:HALO + b1 - b0]
                        fold = 1.0 + t.quality * np.maximum(g, 0.0)
                        li = table.index(cfg.depth * cfg.lambda_margin * t.depth * bias)
                        mu = table.lams[li] * (fold / cfg.lambda_margin)
                        counts = np.empty(b1 - b0, dtype=np.int64)
                        for s in range(0, b1 - b0, TILE_BINS):
                            e = min(b1 - b0, s + TILE_BINS)
                            rng = _rng(cfg.seed, _NOISE, t.grid_index, ci, (b0 + s) // TILE_BINS)
                            m = mu[s:e]
                            if shape:
                                m = m * rng.gamma(shape, 1.0 / shape, e - s)
                            counts[s:e] = rng.poisson(m)
                        np.minimum(counts, table.kmax, out=counts)
                        outs[t.grid_index].write(chrom, size, b0, table.table[li, counts])
                        if t.grid_index in peaks:
                            peaks[t.grid_index].write(chrom, size, b0, fold >= cfg.peak_fold)
                        written += b1 - b0
    finally:
        for o in list(outs.values()) + list(peaks.values()):
            o.close()
    return written


def _write_annotation(cfg: SimConfig, plan: Plan, root: str) -> None:
    """Promoters, gene bodies, enhancers (shared elements) and private elements as BED,
    sorted by start per chromosome; each element is written by the block holding its start."""
    genome = cfg.genome()
    names = ["promoters", "gene_bodies", "enhancers"] + (
        ["private_elements"] if plan.individuals else [])
    files = {n: open(os.path.join(root, "annotation", n + ".bed"), "w")  # noqa: SIM115
             for n in names}
    try:
        for ci, chrom in enumerate(genome.chroms):
            nb, size = genome.n_bins(chrom), genome.size[chrom]
            land = _Landscape(cfg, plan, ci, nb)
            for b0 in range(0, nb, BLOCK_BINS):
                b1 = min(nb, b0 + BLOCK_BINS)
                feats = land.window(b0, b1)
                g, en = feats["genes"], feats["enh"]
                strand = np.where(g["strand"] > 0, "+", "-")
                gname = [f"{chrom}_g{r}_{i}" for r, i in zip(g["region"], g["index"], strict=True)]
                ename = [f"{chrom}_e{r}_{i}" for r, i in zip(en["region"], en["index"], strict=True)]
                rows = {
                    "promoters": (g["tss"] - 40, g["tss"] + 41, g["owner"],
                                  [f"{nm}\t0\t{s}" for nm, s in zip(gname, strand, strict=True)]),
                    "gene_bodies": (np.minimum(g["tss"], g["tes"]), np.maximum(g["tss"], g["tes"]),
                                    g["owner"],
                                    [f"{nm}\t0\t{s}" for nm, s in zip(gname, strand, strict=True)]),
                    "enhancers": (en["center"] - 40, en["center"] + 41, en["owner"], ename),
                }
                for name, (lo, hi, owner, extra) in rows.items():
                    _bed_rows(files[name], chrom, size, nb, b0, b1, lo, hi, owner < 0, extra)
                if plan.individuals:
                    lo = np.concatenate([g["tss"] - 40, en["center"] - 40])
                    hi = np.concatenate([g["tss"] + 41, en["center"] + 41])
                    owner = np.concatenate([g["owner"], en["owner"]])
                    kind = ["promoter"] * len(g["tss"]) + ["enhancer"] * len(en["center"])
                    extra = [f"{plan.individuals[o]}\t{k}" if o >= 0 else ""
                             for o, k in zip(owner, kind, strict=True)]
                    _bed_rows(files["private_elements"], chrom, size, nb, b0, b1, lo, hi,
                              owner >= 0, extra)
    finally:
        for f in files.values():
            f.close()


def _bed_rows(f, chrom, size, nb, b0, b1, lo, hi, keep, extra) -> None:
    lo, hi = np.clip(lo, 0, nb), np.clip(hi, 0, nb)
    own = keep & (lo >= b0) & (lo < b1) & (hi > lo)
    idx = np.flatnonzero(own)
    idx = idx[np.lexsort((hi[idx], lo[idx]))]
    f.write("".join(f"{chrom}\t{lo[i] * BIN_SIZE}\t{min(hi[i] * BIN_SIZE, size)}\t{extra[i]}\n"
                    for i in idx))


def _groups(plan: Plan, workers: int) -> list[list[int]]:
    """Cell keys split into groups of at most MAX_GROUP_TRACKS tracks (a cell key with
    more stays whole), at least ``workers`` groups where there are enough keys."""
    per_key = np.bincount([t.key for t in plan.tracks], minlength=len(plan.keys))
    n = max(workers, math.ceil(len(plan.tracks) / MAX_GROUP_TRACKS))
    n = min(n, int((per_key > 0).sum()))
    groups: list[list[int]] = [[] for _ in range(n)]
    load = np.zeros(n)
    for k in np.argsort(-per_key, kind="stable"):
        if per_key[k]:
            j = int(np.argmin(load))
            groups[j].append(int(k))
            load[j] += per_key[k]
    return [sorted(g) for g in groups if g]


def _same_config(out_dir: str, cfg: SimConfig) -> bool | None:
    """True/False when ``out_dir`` holds a simulation of this / another config; None when
    it holds no simulation."""
    meta = storage.join(out_dir, "simulation.json")
    if not storage.exists(meta):
        return None
    try:
        old = json.loads(storage.read_text(meta))
    except (OSError, ValueError):
        return False
    return (old.get("format") == SIM_FORMAT and old.get("simulator_version") == SIM_VERSION
            and old.get("config") == json.loads(json.dumps(cfg.identity())))


def simulate(out_dir: str, cfg: SimConfig | None = None) -> dict:
    """Write a synthetic consortium to ``out_dir`` (a local path or URL).

    The folder is built aside (``<out_dir>.partial``, or a local temp folder for URLs) and
    moved into place when complete. When ``out_dir`` already holds a simulation of the
    same config, nothing is done; an unfinished ``.partial`` folder of an interrupted run
    is started again from scratch (every bigWig spans the whole genome, so there is no
    smaller unit to resume).

    Returns
    -------
    dict
        Summary: ``out_dir``, ``observed``, ``held_out``, ``cell_keys``, ``assays``,
        ``genome_bp``, ``bins``, ``skipped``.

    Raises
    ------
    InputError
        When ``out_dir`` exists and holds something else (another config, or not a
        simulation) and ``cfg.force`` is off, or when the config cannot be satisfied.
    """
    cfg = cfg or SimConfig()
    genome = cfg.genome()
    plan = make_plan(cfg)
    summary = {"out_dir": str(out_dir), "observed": len(plan.observed),
               "held_out": len(plan.held_out), "cell_keys": len(plan.keys),
               "assays": len(plan.assays), "genome_bp": int(sum(genome.sizes)),
               "bins": genome.total_bins, "skipped": False}
    # Only a simulation (or a new or empty folder) is ever written or replaced.
    if owned.check(out_dir, "simulation", flag="OUT_DIR", empty_ok=False):
        same = _same_config(out_dir, cfg)
        if same and not cfg.force:
            log(f"simulate: {out_dir} already holds this simulation; nothing to do.")
            return {**summary, "skipped": True}
        if not cfg.force:
            raise InputError(
                f"{out_dir} already holds a simulation made with another config. Choose "
                "another folder, or pass --force=true to replace it."
            )
        owned.check_replace(out_dir, SIM_FILES, flag="OUT_DIR")

    url = storage.is_url(out_dir)
    root = tempfile.mkdtemp(prefix="edice-sim-") if url else partial_path(out_dir)
    if not url and os.path.exists(root):
        owned.check(root, "simulation", flag="OUT_DIR's unfinished folder")
        log(f"simulate: removing the unfinished {root} of an earlier run.")
        shutil.rmtree(root)
    try:
        owned.claim(root, "simulation")  # first, so that an unfinished one is known as ours
        for sub in ("bigwig", "truth/peaks", "annotation"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        write_chrom_sizes(os.path.join(root, "chrom.sizes"), genome)
        _write_annotation(cfg, plan, root)
        _write_tracks(cfg, plan, root)
        write_manifest(os.path.join(root, "manifest.tsv"), [
            Track(t.cell_type, t.assay, t.rel_path, "train", t.individual)
            for t in plan.observed])
        person = _write_person_peaks(plan, genome, root)
        _write_targets(os.path.join(root, "truth", "targets.tsv"), plan, person)
        if plan.individuals:
            _write_observed_truth(os.path.join(root, "truth", "observed.tsv"), plan, person)
        meta = {"format": SIM_FORMAT, "simulator_version": SIM_VERSION, "tool": "edice-dist",
                "tool_version": __version__, "config": cfg.identity(),
                "chroms": genome.to_json(), "tissues": plan.tissues,
                "cell_types": {c: plan.tissues[plan.cell_tissue[i]]
                               for i, c in enumerate(plan.cell_types)},
                "individuals": plan.individuals,
                "summary": {k: v for k, v in summary.items() if k not in ("out_dir", "skipped")}}
        storage.write_text_atomic(os.path.join(root, "simulation.json"),
                                  json.dumps(meta, indent=2) + "\n")
        if url:
            _publish_url(root, out_dir)
        else:
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.replace(root, out_dir)
    finally:
        if url:
            shutil.rmtree(root, ignore_errors=True)

    log(f"simulate: {summary['observed']} observed tracks of {summary['cell_keys']} cells x "
        f"{summary['assays']} assays"
        + (f" ({len(plan.individuals)} individuals)" if plan.individuals else "")
        + f", {summary['held_out']} held out; genome {summary['genome_bp']:,} bp in "
        f"{len(genome.chroms)} chromosomes ({summary['bins']:,} bins of {BIN_SIZE} bp).")
    log(f"simulate: manifest {storage.join(out_dir, 'manifest.tsv')}, "
        f"truth {storage.join(out_dir, 'truth', 'targets.tsv')}, "
        f"chrom sizes {storage.join(out_dir, 'chrom.sizes')}.")
    return summary


def _write_tracks(cfg: SimConfig, plan: Plan, root: str) -> None:
    groups = _groups(plan, cfg.workers)
    cfg_json = asdict(cfg)
    prog = Progress(len(groups), "simulate", unit="track groups")
    if cfg.workers == 1 or len(groups) == 1:
        for g in groups:
            _write_group(cfg_json, root, g)
            prog.update()
        return
    # spawn: the caller may hold threads (Ray, torch) that fork would copy half-way
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(cfg.workers, len(groups)), mp_context=ctx) as ex:
        futs = [ex.submit(_write_group, cfg_json, root, g) for g in groups]
        for f in cf.as_completed(futs):
            f.result()
            prog.update()


def _write_targets(path: str, plan: Plan, person: dict[str, str]) -> None:
    ind = bool(plan.individuals)
    cols = ["cell_type", "assay", "path", "peaks"] + (["individual", "person_peaks"] if ind else [])
    lines = ["\t".join(cols)]
    for t in plan.held_out:
        row = [t.cell_type, t.assay, f"{t.track_id}.bigWig", f"peaks/{t.track_id}.bed"]
        lines.append("\t".join(row + ([t.individual, person.get(t.track_id, "")] if ind else [])))
    storage.write_text_atomic(path, "\n".join(lines) + "\n")


def _write_observed_truth(path: str, plan: Plan, person: dict[str, str]) -> None:
    """``truth/observed.tsv``: every observed track of an individual with its peaks and
    person-specific peaks, the truth of workflows that hide observed tracks
    (``edice personal``); ``path`` is the observed bigWig."""
    lines = ["\t".join(["cell_type", "assay", "path", "peaks", "individual", "person_peaks"])]
    for t in plan.observed:
        lines.append("\t".join([t.cell_type, t.assay, f"../{t.rel_path}",
                                f"peaks/{t.track_id}.bed", t.individual,
                                person.get(t.track_id, "")]))
    storage.write_text_atomic(path, "\n".join(lines) + "\n")


def _write_person_peaks(plan: Plan, genome: Genome, root: str) -> dict[str, str]:
    """With individuals, ``truth/person_peaks/<track>.bed`` for every measured track whose
    cell type and assay another individual has measured too: its peaks that are peaks in
    none of those (:func:`edice_dist.personpeaks.person_specific`, runs >= 150 bp).

    Returns
    -------
    dict
        track id -> path of its BED relative to ``truth/``.
    """
    from .personpeaks import BedMasks, intervals, min_bins, person_specific, write_bed

    if not plan.individuals:
        return {}
    os.makedirs(os.path.join(root, "truth", "person_peaks"), exist_ok=True)
    groups: dict[tuple[str, str], list[SimTrack]] = {}
    for t in plan.tracks:
        groups.setdefault((t.cell_type, t.assay), []).append(t)
    shortest = min_bins(bin_size=BIN_SIZE)
    out = {}
    for group in groups.values():
        if len(group) < 2:  # no other individual to compare with
            continue
        beds = [BedMasks(os.path.join(root, "truth", "peaks", t.track_id + ".bed"), genome)
                for t in group]
        found: dict[str, dict[str, np.ndarray]] = {t.track_id: {} for t in group}
        for c in genome.chroms:  # one chromosome of the group's masks at a time
            masks = [b.mask(c) for b in beds]
            for i, t in enumerate(group):
                mask = person_specific(masks[i], masks[:i] + masks[i + 1:], shortest)
                found[t.track_id][c] = intervals(mask, genome.size[c], BIN_SIZE)
        for t in group:
            rel = f"person_peaks/{t.track_id}.bed"
            write_bed(os.path.join(root, "truth", rel), found[t.track_id], genome)
            out[t.track_id] = rel
    return out


def _publish_url(local: str, url: str) -> None:
    """Upload a finished local folder to ``<url>.partial`` and rename it to ``url``."""
    part = partial_path(url)
    storage.remove(part)
    for dirpath, _, files in os.walk(local):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local).replace(os.sep, "/")
            storage.upload(src, storage.join(part, rel))
    storage.remove(url)
    storage.rename(part, url)
