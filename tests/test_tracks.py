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
