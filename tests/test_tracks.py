import pytest

from edice_dist.errors import InputError
from edice_dist.tracks import Track, parse_targets, read_manifest, write_manifest


def _write(tmp_path, text):
    p = tmp_path / "m.tsv"
    p.write_text(text)
    return str(p)


def test_manifest_resolves_relative_paths_and_defaults(tmp_path):
    m = _write(tmp_path, "cell_type\tassay\tpath\nE003\tH3K4me3\tbw/a.bigWig\nE004\tDNase\t/abs/b.bw\n")
    tracks = read_manifest(m)
    assert tracks[0].path == str(tmp_path / "bw" / "a.bigWig")
    assert tracks[1].path == "/abs/b.bw"
    assert all(t.split == "train" and t.individual == "" for t in tracks)
    assert tracks[0].track_id == "E003-H3K4me3"


def test_manifest_with_individuals_roundtrip(tmp_path):
    tracks = [Track("liver", "H3K27ac", str(tmp_path / "x.bw"), "val", "ind1"),
              Track("liver", "H3K27ac", str(tmp_path / "y.bw"), "train", "ind2")]
    out = str(tmp_path / "out.tsv")
    write_manifest(out, tracks, relative_to=str(tmp_path))
    assert "x.bw" in open(out).read() and str(tmp_path) not in open(out).read()
    back = read_manifest(out)
    assert back == tracks
    assert back[0].cell_key == "liver@ind1"


@pytest.mark.parametrize(
    "text, msg",
    [
        ("", "is empty"),
        ("cell_type\tpath\nE1\tx.bw\n", "lacks the column"),
        ("cell_type\tassay\tpath\n", "no tracks"),
        ("cell_type\tassay\tpath\nE1\tK4\ta.bw\nE1\tK4\tb.bw\n", "listed twice"),
        ("cell_type\tassay\tpath\tsplit\nE1\tK4\ta.bw\tdev\n", "split"),
        ("cell_type\tassay\tpath\nE 1\tK4\ta.bw\n", "characters"),
        ("cell_type\tassay\tpath\nE1\tK4\t\n", "path column is empty"),
    ],
)
def test_bad_manifests(tmp_path, text, msg):
    with pytest.raises(InputError, match=msg) as e:
        read_manifest(_write(tmp_path, text))
    assert "m.tsv" in str(e.value)


def test_parse_targets_list_and_file(tmp_path):
    assert parse_targets("E1:H3K4me3, E2:DNase") == [("E1", "H3K4me3"), ("E2", "DNase")]
    f = tmp_path / "t.tsv"
    f.write_text("cell_type\tassay\tindividual\nliver\tK27ac\tind1\nlung\tK4me1\t\n")
    assert parse_targets(str(f)) == [("liver@ind1", "K27ac"), ("lung", "K4me1")]
    with pytest.raises(InputError, match="cell_type:assay"):
        parse_targets("E1-H3K4me3,E2:DNase")


def test_one_name_rule(tmp_path):
    """Every name that becomes part of a path (cell type, assay, individual), wherever it
    is read, follows one rule: no '/', no leading '.', at most MAX_NAME characters."""
    from edice_dist.tracks import MAX_NAME, name_problem

    for ok in ("E003", "IMR-90", "DNase-seq", "H3K4me3", "T_cell(CD4+)", "x" * MAX_NAME):
        assert name_problem(ok) is None, ok
    for bad, why in (("", "empty"), (".", "'.'"), ("..", "'.'"), (".hidden", "'.'"),
                     ("../x", "characters"), ("a/b", "characters"), ("a b", "characters"),
                     ("x" * (MAX_NAME + 1), "longer")):
        assert why in name_problem(bad), bad
    m = _write(tmp_path, "cell_type\tassay\tpath\n..\tK4\ta.bw\n")
    with pytest.raises(InputError, match=r"line 2: cell_type column '\.\.' starts with '\.'"):
        read_manifest(m)


def test_names_with_dashes_may_not_share_a_file_name(tmp_path):
    """Row: cell or assay names containing '-' let two pairs map to one bigWig name. The
    bigWig stays <cell_type>-<assay>.bigWig (SPEC 3; dashes are common in real names);
    a vocabulary where two (cell, assay) pairs would share a name is refused, naming both
    pairs, wherever it is read."""
    m = _write(tmp_path, "cell_type\tassay\tpath\nIMR-90\tDNase-seq\ta.bw\nIMR\t90-K4\tb.bw\n")
    assert len(read_manifest(m)) == 2  # dashes alone are fine
    m = _write(tmp_path, "cell_type\tassay\tpath\nA-B\tC\ta.bw\nA\tK4\tb.bw\nA\tB-C\tc.bw\n")
    with pytest.raises(InputError, match=r"m\.tsv: the pairs A x B-C and A-B x C would both "
                                         r"be named A-B-C \(bigWig A-B-C\.bigWig\)"):
        read_manifest(m)
    # Also when the two pairs are not both measured: any pair of the vocabulary may be a
    # target (here A-B x C is not in the manifest).
    m = _write(tmp_path, "cell_type\tassay\tpath\nA-B\tK4\ta.bw\nA\tB-C\tb.bw\nX\tC\tc.bw\n")
    with pytest.raises(InputError, match="would both be named A-B-C"):
        read_manifest(m)


def test_text_inputs_with_a_byte_order_mark(tmp_path):
    """Row: a manifest starting with a UTF-8 byte-order mark ("missing column
    '\\ufeffcell_type'"); the same for every text input (targets files here)."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "m.tsv").write_bytes(bom + b"cell_type\tassay\tpath\nE1\tK4\ta.bw\n")
    assert read_manifest(str(tmp_path / "m.tsv"))[0].cell_type == "E1"
    (tmp_path / "t.tsv").write_bytes(bom + b"cell_type\tassay\nE1\tK4\n")
    assert parse_targets(str(tmp_path / "t.tsv")) == [("E1", "K4")]


def test_targets_file_with_a_short_row(tmp_path):
    """Row: a targets TSV with a short row gave an AttributeError traceback."""
    f = tmp_path / "t.tsv"
    f.write_text("cell_type\tassay\n# a comment\nE1\tK4\nE2\n")
    with pytest.raises(InputError, match=r"t\.tsv, line 4: 'E2' lacks an assay"):
        parse_targets(str(f))
    f.write_text("cell_type\tassay\n\tK4\n")
    with pytest.raises(InputError, match=r"line 2: .* lacks a cell_type"):
        parse_targets(str(f))
