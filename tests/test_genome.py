import math

import numpy as np
import pytest

from edice_dist.errors import InputError
from edice_dist.genome import Genome, bed_bin_mask, n_bins, read_bed, read_chrom_sizes


def test_n_bins_is_ceil():
    for size in [1, 24, 25, 26, 49, 50, 51, 1_000_003]:
        assert n_bins(size) == math.ceil(size / 25)
        assert (n_bins(size) - 1) * 25 < size <= n_bins(size) * 25


def test_read_chrom_sizes_and_subset(tmp_path):
    p = tmp_path / "g.sizes"
    p.write_text("chr1\t1000\n# comment\nchr2 251\n\nchrM\t16569\n")
    g = read_chrom_sizes(str(p))
    assert g.chroms == ("chr1", "chr2", "chrM")
    assert g.n_bins("chr2") == 11
    assert g.total_bins == 40 + 11 + 663
    sub = read_chrom_sizes(str(p), ["chrM", "chr1"])
    assert sub.chroms == ("chr1", "chrM")  # genome order kept


@pytest.mark.parametrize(
    "text, msg",
    [
        ("chr1\n", "line 1"),
        ("chr1\t-5\n", "positive integer"),
        ("chr1\t10\nchr1\t20\n", "listed twice"),
        ("", "lists no chromosomes"),
    ],
)
def test_bad_chrom_sizes(tmp_path, text, msg):
    p = tmp_path / "g.sizes"
    p.write_text(text)
    with pytest.raises(InputError, match=msg):
        read_chrom_sizes(str(p))


def test_missing_chrom_sizes_and_unknown_chrom(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_chrom_sizes(str(tmp_path / "nope"))
    with pytest.raises(InputError, match=r"BED file .*peaks.bed does not exist"):
        read_bed(str(tmp_path / "peaks.bed"))
    p = tmp_path / "g.sizes"
    p.write_text("chr1\t100\n")
    with pytest.raises(InputError, match="chr9"):
        read_chrom_sizes(str(p), ["chr9"])


def test_chunks_cover_every_bin_once():
    g = Genome(("a", "b"), (2501, 75))
    chunks = g.chunks(30)
    for chrom in g.chroms:
        cs = [c for c in chunks if c.chrom == chrom]
        covered = np.concatenate([np.arange(c.start, c.stop) for c in cs])
        assert np.array_equal(covered, np.arange(g.n_bins(chrom)))
        assert [c.index for c in cs] == list(range(len(cs)))
        assert all(c.start == c.index * 30 for c in cs)


def test_bed_bin_mask_against_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 5000, 40)
    ends = starts + rng.integers(1, 300, 40)
    bed = tmp_path / "p.bed"
    bed.write_text("".join(f"chr1\t{s}\t{e}\tpeak\n" for s, e in zip(starts, ends, strict=True)))
    iv = read_bed(str(bed))["chr1"]
    for lo, hi in [(0, 220), (37, 90), (150, 260)]:
        mask = bed_bin_mask(iv, lo, hi)
        expect = np.array([
            any(s < (b + 1) * 25 and e > b * 25 for s, e in zip(starts, ends, strict=True))
            for b in range(lo, hi)
        ])
        assert np.array_equal(mask, expect)
