"""The track hub beside the bigWigs, checked as a genome browser would read it.

The hub files are parsed here by a parser of the UCSC format written for this test
(stanzas of ``key value`` lines separated by blank lines), independent of the code that
writes them. Every setting name and value is checked against ``trackhub``'s table of the
settings documented by UCSC for each track type (``trackhub.constants``; trackhub is a
maintained PyPI library that builds hubs and validates settings against UCSC's trackDb
documentation). UCSC's own ``hubCheck`` is a binary that neither Debian nor PyPI packages,
so the structural rules it applies (required fields, label limits, names, parents,
subgroups, files that exist) are checked here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.parse

import numpy as np
import pyBigWig
import pytest
from test_export import CHROMS, TARGETS, make_run

from edice_dist import hub, runfolder, store
from edice_dist.errors import InputError
from edice_dist.export import export
from edice_dist.genome import Genome
from edice_dist.tracks import Track

BASE = "https://example.org/some/bucket/run/bigwig/"
"""A base URL the hub is imagined served under: every path must resolve below it."""

# ----------------------------------------------------------------------------- the parser


def parse_stanzas(text: str) -> list[list[tuple[str, str]]]:
    """UCSC's ``ra`` format: stanzas of ``key value`` lines, blank lines between them,
    ``#`` comments, leading white space ignored."""
    stanzas, cur = [], []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            continue
        if not s:
            if cur:
                stanzas.append(cur)
            cur = []
            continue
        key, _, value = s.partition(" ")
        cur.append((key, value.strip()))
    if cur:
        stanzas.append(cur)
    return stanzas


def as_dict(stanza) -> dict[str, str]:
    d = dict(stanza)
    assert len(d) == len(stanza), f"a setting is repeated in {stanza}"
    return d


def resolve(base_file: str, folder: str, ref: str) -> str:
    """The local file that a browser fetching ``hub.txt`` under :data:`BASE` reads for
    ``ref`` named in ``base_file``: relative URLs resolve against the naming file's URL."""
    url = urllib.parse.urljoin(BASE + base_file, ref)
    assert url.startswith(BASE), f"{ref!r} in {base_file} leaves the hub folder"
    rel = urllib.parse.unquote(url[len(BASE):])
    return os.path.join(folder, *rel.split("/"))


NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # stricter than the [A-Za-z0-9_.-] browsers take


def allowed_settings(kind: str) -> set[str]:
    """The settings trackhub knows for a track type (``bigWig``) or a composite of it."""
    from trackhub import constants

    names = set(constants.track_fields["all"]) | set(constants.track_fields["bigWig"])
    if kind == "composite":
        names |= set(constants.track_fields["compositeTrack"])
        names |= set(constants.track_fields["subGroups"])
    return names


def valid(param, value: str) -> bool:
    """trackhub's validator of a setting (it returns False or raises when invalid)."""
    try:
        return bool(param.validate(value))
    except Exception:
        return False


def check_hub(folder: str) -> dict:
    """Every rule a browser and UCSC's hubCheck apply that a test can check offline.

    Returns
    -------
    dict
        ``genome``, ``composites`` (name -> settings), ``subtracks`` (name -> settings),
        ``files`` (track name -> the local file it reads, or its absolute URL).
    """
    from trackhub import constants

    (hubst,) = [as_dict(s) for s in parse_stanzas(open(os.path.join(folder, "hub.txt")).read())]
    assert set(hubst) == {"hub", "shortLabel", "longLabel", "genomesFile", "email"}, hubst
    assert NAME.match(hubst["hub"])
    assert len(hubst["shortLabel"]) <= 17 and len(hubst["longLabel"]) <= 76
    assert "@" in hubst["email"]
    genomes_file = resolve("hub.txt", folder, hubst["genomesFile"])
    gstanzas = [as_dict(s) for s in parse_stanzas(open(genomes_file).read())]
    assert len(gstanzas) == 1 and set(gstanzas[0]) == {"genome", "trackDb"}
    genome = gstanzas[0]["genome"]
    gname = os.path.relpath(genomes_file, folder)
    trackdb = resolve(gname, folder, gstanzas[0]["trackDb"])
    tname = os.path.relpath(trackdb, folder)

    stanzas = [as_dict(s) for s in parse_stanzas(open(trackdb).read())]
    assert stanzas, "empty trackDb"
    names = [s.get("track") for s in stanzas]
    assert all(n and NAME.match(n) for n in names), names
    assert len(set(names)) == len(names), "track names must be unique"
    shorts = [s["shortLabel"] for s in stanzas]
    longs = [s["longLabel"] for s in stanzas]
    assert all(0 < len(x) <= 17 for x in shorts), [x for x in shorts if len(x) > 17]
    assert all(0 < len(x) <= 76 for x in longs), [x for x in longs if len(x) > 76]
    assert len(set(shorts)) == len(shorts) and len(set(longs)) == len(longs), "labels not unique"

    composites, subtracks, files = {}, {}, {}
    for s in stanzas:
        kind = "composite" if s.get("compositeTrack") == "on" else "bigWig"
        assert s["type"].split()[0] == "bigWig"
        unknown = {k for k in s if not k.startswith("subGroup")} - allowed_settings(kind)
        assert not unknown, f"{s['track']}: settings unknown to UCSC for {kind}: {unknown}"
        for k, v in s.items():
            if k in constants.param_dict and k not in ("type",):
                assert valid(constants.param_dict[k], v), (s["track"], k, v)
        (composites if kind == "composite" else subtracks)[s["track"]] = s

    for name, c in composites.items():
        groups = {}
        for k, v in c.items():
            if re.fullmatch(r"subGroup\d+", k):
                gname_, glabel, *tags = v.split()
                assert NAME.match(gname_) and "=" not in glabel
                pairs = dict(t.split("=", 1) for t in tags)
                assert len(pairs) == len(tags) and all(NAME.match(t) for t in pairs), v
                groups[gname_] = pairs
        assert groups, f"composite {name} has no subgroups"
        for dim in c["dimensions"].split():
            assert dim.split("=")[1] in groups, dim
        for so in c["sortOrder"].split():
            assert so.split("=")[0] in groups and so.split("=")[1] in "+-", so
        c["_groups"] = groups
    for name, s in subtracks.items():
        parent, *state = s["parent"].split()
        assert parent in composites and state in ([], ["on"], ["off"]), s["parent"]
        for k in ("bigDataUrl", "shortLabel", "longLabel", "subGroups", "color"):
            assert k in s, (name, k)
        given = dict(t.split("=", 1) for t in s["subGroups"].split())
        groups = composites[parent]["_groups"]
        assert set(given) == set(groups), (name, given, groups)
        assert all(given[g] in groups[g] for g in given), (name, given)
        url = s["bigDataUrl"]
        if re.match(r"^(https?|ftp)://", url):
            files[name] = url
            continue
        assert "://" not in url and not url.startswith("/"), f"{name}: not relative: {url}"
        path = resolve(tname, folder, url)
        assert os.path.isfile(path), f"{name}: {url} -> {path} does not exist"
        bw = pyBigWig.open(path)  # a readable bigWig, not just a file
        assert bw is not None and bw.isBigWig() and bw.chroms()
        bw.close()
        files[name] = path
    # Every composite has subtracks, and one colour per kind within it.
    for name in composites:
        members = [s for s in subtracks.values() if s["parent"].split()[0] == name]
        assert members, f"composite {name} is empty"
    return {"genome": genome, "composites": composites, "subtracks": subtracks,
            "files": files}


# ----------------------------------------------------------------------------- fixtures


def write_bw(path, chroms=CHROMS, value=1.0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bw = pyBigWig.open(str(path), "w")
    bw.addHeader(list(chroms))
    for c, size in chroms:
        bw.addEntries([c], [0], ends=[size], values=[float(value)])
    bw.close()


def make_observed_store(tmp_path, sources: list[Track]) -> str:
    path = str(tmp_path / "store")
    genome = Genome(tuple(c for c, _ in CHROMS), tuple(s for _, s in CHROMS))
    root = store.create(path, genome, sources, chunk_bins=32)
    for c in root.attrs["chroms"]:  # every chunk written (zeros): a finished store
        arr = root["signal"][c["array"]].with_config({"write_empty_chunks": True})
        arr[:] = np.zeros(arr.shape, dtype=arr.dtype)
    store.mark_complete(path)
    return path


def with_run_json(run: str, store_path: str) -> None:
    runfolder.write(run, {"format": runfolder.RUN_FORMAT, "store": store_path,
                          "targets": TARGETS})


# ----------------------------------------------------------------------------- tests


def test_hub_of_an_exported_run(tmp_path, ray_local):
    """``edice export`` writes a valid hub: a composite per assay, every imputed bigWig in
    it, observed bigWigs beside them when asked, one colour per assay."""
    run = str(tmp_path / "run")
    make_run(run, seed=1)
    src = tmp_path / "sources"
    observed = [Track("liver", "H3K4me3", str(src / "liver-K4.bw"), "train"),
                Track("lung", "DNase", str(src / "lung.bigWig"), "test", "ind2"),
                Track("brain", "H3K27me3", str(src / "brain K27.bigWig"), "val"),
                Track("gut", "H3K27ac", str(src / "gut.bedGraph"), "train")]
    for t in observed[:3]:
        write_bw(t.path)
    (src / "gut.bedGraph").write_text("chr10\t0\t100\t1\n")
    with_run_json(run, make_observed_store(tmp_path, observed))

    s = export(run, hub_observed="copy", genome="hg19")
    bw_dir = os.path.join(run, "bigwig")
    h = check_hub(bw_dir)
    assert s["hub"]["genome"] == h["genome"] == "hg19"
    comps, subs = h["composites"], h["subtracks"]
    # One composite per assay, named after it, holding only that assay's tracks.
    assert sorted(comps) == ["DNase", "H3K27ac", "H3K27me3", "H3K4me3"]
    for name, t in subs.items():
        assert t["parent"].split()[0] in name
    imputed = {os.path.basename(f) for n, f in h["files"].items()
               if subs[n]["subGroups"].endswith("kind=imputed")}
    assert imputed == {t["track_id"] + ".bigWig" for t in TARGETS}
    obs = {n: f for n, f in h["files"].items() if subs[n]["subGroups"].endswith("kind=observed")}
    # The bedGraph source is left out; the three bigWigs are copied inside the hub.
    assert sorted(os.path.relpath(f, bw_dir) for f in obs.values()) == [
        "observed/brain-H3K27me3.bigWig", "observed/liver-H3K4me3.bigWig",
        "observed/lung@ind2-DNase.bigWig"]
    for f in obs.values():
        assert not os.path.islink(f)
    # Colours: Roadmap's for these marks; observed a darker shade of the imputed colour.
    rgb = {n: tuple(int(x) for x in c["color"].split(",")) for n, c in comps.items()}
    assert rgb["H3K4me3"] == (255, 0, 0) and rgb["H3K27ac"][0] == 255 > rgb["H3K27ac"][1] > 0
    for t in subs.values():
        c = tuple(int(x) for x in t["color"].split(","))
        parent = rgb[t["parent"].split()[0]]
        if "kind=imputed" in t["subGroups"]:
            assert c == parent
        else:
            assert all(a <= b for a, b in zip(c, parent, strict=True)) and c != parent
    # The held-out observed track says so in its long label.
    lung = next(t for t in subs.values() if "lung" in t["track"] and "observed" in t["track"])
    assert "held out" in lung["longLabel"] and "individual ind2" in lung["longLabel"]

    # A re-export keeps the copies and the hub; --no-hub writes none.
    mtime = os.path.getmtime(next(iter(obs.values())))
    export(run, hub_observed="copy", genome="hg19")
    assert os.path.getmtime(next(iter(obs.values()))) == mtime
    run2 = str(tmp_path / "run2")
    make_run(run2)
    export(run2, hub=False)
    assert not {"hub.txt", "genomes.txt", "trackDb.txt"} & set(os.listdir(run2 + "/bigwig"))


def test_observed_links(tmp_path):
    """``link``: local sources by symbolic links inside the hub folder, http(s) sources by
    their URL, sources no browser reads (``s3://``) left out."""
    folder = tmp_path / "bigwig"
    folder.mkdir()
    write_bw(tmp_path / "elsewhere" / "a.bigWig")
    tracks = [Track("liver", "H3K4me3", str(tmp_path / "elsewhere" / "a.bigWig")),
              Track("lung", "DNase", "https://data.example.org/lung.bigWig"),
              Track("gut", "DNase", "s3://bucket/gut.bigWig"),
              Track("gut", "H3K4me3", str(tmp_path / "missing.bigWig"))]
    out = hub.observed_tracks(tracks, str(folder), "link")
    assert [(t.cell_key, t.url) for t in out] == [
        ("liver", "observed/liver-H3K4me3.bigWig"),
        ("lung", "https://data.example.org/lung.bigWig")]
    link = folder / "observed" / "liver-H3K4me3.bigWig"
    assert os.path.islink(link) and os.readlink(link) == str(tmp_path / "elsewhere/a.bigWig")
    write_bw(folder / "liver-H3K4me3.bigWig")
    out.append(hub.HubTrack("liver", "H3K4me3", "imputed", "liver-H3K4me3.bigWig"))
    hub.write_hub(str(folder), out, "hg38")
    h = check_hub(str(folder))
    assert "https://data.example.org/lung.bigWig" in h["files"].values()
    assert str(link) in h["files"].values()  # the browser reads the link inside the hub
    # Linking again, then copying, replaces the link by a copy.
    hub.observed_tracks(tracks[:1], str(folder), "link")
    hub.observed_tracks(tracks[:1], str(folder), "copy")
    assert not os.path.islink(link) and os.path.getsize(link) > 0
    with pytest.raises(InputError, match="one of none, link, copy"):
        hub.observed_tracks(tracks, str(folder), "move")


CELLS = ["liver", "a.b", "a_b", "a+b", "x(1)", "[y]", "lung@ind2", "lung@ind10",
         "a_very_long_cell_type_name_of_an_atlas_that_goes_on_and_on",
         "a_very_long_cell_type_name_of_an_atlas_that_goes_on_and_on_2", "9cells"]
ASSAYS = ["H3K4me3", "H3K4me3+", "DNase-seq", "Mystery_mark", "H2A.Z", "7mark"]


def test_names_and_labels_are_unique_legal_and_within_limits(tmp_path):
    """Cell types and assays with every character a manifest allows, long names and names
    that clash once cleaned, become unique legal track names and labels within UCSC's
    limits; bigDataUrl finds every file whatever its name holds."""
    folder = tmp_path / "bigwig"
    tracks = []
    for c in CELLS:
        for a in ASSAYS:
            name = f"{c}-{a}.bigWig"
            write_bw(folder / name)
            tracks.append(hub.HubTrack(c, a, "imputed", name))
            if c.startswith("a"):
                write_bw(folder / "observed" / name)
                tracks.append(hub.HubTrack(c, a, "observed", "observed/" + name, "held out"))
    hub.write_hub(str(folder), tracks, "hg38", space="arcsinh", name="x" * 80,
                  long_label="y" * 200)
    h = check_hub(str(folder))  # names, limits, uniqueness and files: checked there
    assert len(h["subtracks"]) == len(tracks) and len(h["composites"]) == len(ASSAYS)
    # Each subtrack reads its own file.
    by_file = {os.path.relpath(f, folder): n for n, f in h["files"].items()}
    assert set(by_file) == {t.url for t in tracks}
    # Of 88 subtracks about 10 are on when the hub loads: a cell type of each assay, with
    # its observed track beside it where there is one.
    on = [t for t in h["subtracks"].values() if t["parent"].endswith(" on")]
    assert len(on) <= 2 * len(ASSAYS)
    assert {t["parent"].split()[0] for t in on} == set(h["composites"])
    assert all(c["viewLimits"] == "0:4" for c in h["composites"].values())


def test_short_labels_keep_what_tells_tracks_apart():
    """Cell names that differ at their end (blood_01, blood_02) stay apart in 17 characters
    without a counter; a label that fits is left whole."""
    labels = [hub.subtrack_label(f"blood_{i:02d}", "H3K4me3", "obs") for i in range(1, 5)]
    assert len(set(labels)) == 4 and all(len(x) <= 17 for x in labels)
    assert all(f"_{i:02d} " in x and "K4me3 obs" in x for i, x in enumerate(labels, 1))
    assert hub.subtrack_label("liver", "H3K4me3", "obs") == "liver H3K4me3 obs"
    assert hub.subtrack_label("blood_01", "H3K4me3", "") == "blood_01 H3K4me3"


def test_a_second_kind_per_target_joins_the_same_composite(tmp_path):
    """A per-bin spread bigWig per target (a later feature) is one more kind of subtrack in
    the composite of its assay, in a lighter shade, with its own matrix column."""
    folder = tmp_path / "bigwig"
    tracks = []
    for c in ("liver", "lung"):
        write_bw(folder / f"{c}-H3K27ac.bigWig")
        write_bw(folder / f"{c}-H3K27ac.spread.bigWig")
        tracks += [hub.HubTrack(c, "H3K27ac", "imputed", f"{c}-H3K27ac.bigWig"),
                   hub.HubTrack(c, "H3K27ac", "spread", f"{c}-H3K27ac.spread.bigWig")]
    hub.write_hub(str(folder), tracks, "hg38")
    h = check_hub(str(folder))
    (comp,) = h["composites"].values()
    assert comp["_groups"]["kind"] == {"imputed": "Imputed", "spread": "Spread"}
    spread = [t for t in h["subtracks"].values() if "kind=spread" in t["subGroups"]]
    assert len(spread) == 2
    base = tuple(map(int, comp["color"].split(",")))
    for t in spread:  # lighter: every channel towards white
        c = tuple(map(int, t["color"].split(",")))
        assert c != base and all(a >= b for a, b in zip(c, base, strict=True))


def test_assay_colours_are_conventional_and_stable():
    assert hub.assay_color("H3K4me3") == (255, 0, 0)
    assert hub.assay_color("h3k4me3") == hub.assay_color("H3K4ME3")
    assert hub.assay_color("DNase-seq") == hub.assay_color("DNase")
    r, g, b = hub.assay_color("H3K36me3")
    assert g > 100 and r == b == 0  # green
    r, g, b = hub.assay_color("H3K27me3")
    assert b > r and b > g  # grey-blue
    # An unknown assay's colour is the same in another interpreter with another hash seed.
    code = "from edice_dist.hub import assay_color; print(assay_color('Mystery_mark'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}, check=True).stdout
            for seed in (1, 2)}
    assert outs == {f"{hub.assay_color('Mystery_mark')}\n"}
    assert hub.assay_color("Mystery_mark") != hub.assay_color("Other_mark")


def test_genome_is_recognised_from_chromosome_sizes(capsys):
    assert hub.guess_genome([("chr1", 248956422), ("chr2", 242193529)]) == "hg38"
    assert hub.guess_genome([("21", 48129895)]) == "hg19"
    assert hub.guess_genome([("chr1", 195471971)]) == "mm10"
    assert hub.guess_genome([("chr1", 1200007)]) is None
    assert hub.resolve_genome(None, [("chr1", 1200007)]) == "hg38"
    assert "Set --genome" in capsys.readouterr().err
    assert hub.resolve_genome("mm39", [("chr21", 46709983)]) == "mm39"
    assert "sizes are those of hg38" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a UCSC assembly name"):
        hub.resolve_genome("hg38/../x", [])


def test_export_command_line_writes_the_hub(tmp_path, ray_local):
    """``edice export RUN_DIR --genome mm10``: the CLI path, genome and no observed."""
    from edice_dist import cli

    run = tmp_path / "myrun"
    make_run(str(run))
    assert cli.main(["export", str(run), "--genome", "mm10", "--hub-email", "me@lab.org"]) == 0
    h = check_hub(str(run / "bigwig"))
    assert h["genome"] == "mm10" and len(h["subtracks"]) == len(TARGETS)
    text = (run / "bigwig" / "hub.txt").read_text()
    assert "email me@lab.org" in text and "myrun" in text
    assert cli.main(["export", str(run), "--genome", "hg 38"]) == 1


def test_check_hub_catches_what_it_should(tmp_path):
    """The checker fails on the faults it is there for (so a pass means something)."""
    folder = tmp_path / "bigwig"
    write_bw(folder / "a-X.bigWig")
    hub.write_hub(str(folder), [hub.HubTrack("a", "X", "imputed", "a-X.bigWig")], "hg38")
    check_hub(str(folder))
    good = (folder / "trackDb.txt").read_text()
    faults = [good.replace("bigDataUrl a-X.bigWig", "bigDataUrl b-X.bigWig"),  # no file
              good.replace("shortLabel a X", "shortLabel " + "a" * 18),  # too long
              good.replace("track a_X_imputed", "track a-X imputed"),  # bad name
              good.replace("windowingFunction mean+whiskers", "windowingFunction median"),
              good.replace("kind=imputed", "kind=spread"),  # undefined subgroup tag
              good.replace("parent X on", "parent Y on"),
              good.replace("bigDataUrl a-X.bigWig", "bigDataUrl ../a-X.bigWig"),
              good + "\ntrack X\ntype bigWig\nshortLabel s\nlongLabel l\n",  # duplicate
              good.replace("alwaysZero on", "alwaysZero on\nnoSuchSetting 1")]
    for bad in faults:
        (folder / "trackDb.txt").write_text(bad)
        with pytest.raises(AssertionError):
            check_hub(str(folder))


def test_serve_answers_byte_ranges_with_cors(tmp_path):
    """`edice serve`: what IGV and igv.js need from a server, which http.server lacks."""
    import threading
    import urllib.error
    import urllib.request

    from edice_dist.serve import make_server

    run = tmp_path / "run"
    make_run(str(run))
    with_run_json(str(run), "")
    folder = run / "bigwig"
    write_bw(folder / "lung@ind2-DNase.bigWig")
    write_bw(tmp_path / "elsewhere.bigWig", value=3.0)
    (folder / "observed").mkdir()
    os.symlink(tmp_path / "elsewhere.bigWig", folder / "observed" / "x.bigWig")
    (folder / "hub.txt").write_text("hub x\n")
    server = make_server(str(run), port=0)  # a run folder: its bigwig/ is served
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"

    def get(path, rng=None, method="GET"):
        req = urllib.request.Request(base + path, method=method,
                                     headers={"Range": rng} if rng else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), b""

    try:
        data = (folder / "lung@ind2-DNase.bigWig").read_bytes()
        status, head, body = get("hub.txt")
        assert (status, body, head["Access-Control-Allow-Origin"]) == (200, b"hub x\n", "*")
        status, head, body = get("lung%40ind2-DNase.bigWig", "bytes=10-19")
        assert (status, body) == (206, data[10:20])
        assert head["Content-Range"] == f"bytes 10-19/{len(data)}"
        assert head["Content-Length"] == "10" and head["Accept-Ranges"] == "bytes"
        assert "Content-Range" in head["Access-Control-Expose-Headers"]
        assert get("lung%40ind2-DNase.bigWig", "bytes=-7")[2] == data[-7:]
        assert get("lung%40ind2-DNase.bigWig", "bytes=100-")[2] == data[100:]
        assert get("lung%40ind2-DNase.bigWig", f"bytes={len(data)}-")[0] == 416
        assert get("lung%40ind2-DNase.bigWig")[2] == data
        linked = (tmp_path / "elsewhere.bigWig").read_bytes()
        assert get("observed/x.bigWig", "bytes=0-3")[2] == linked[:4]
        status, head, _ = get("liver-H3K4me3.bigWig", method="OPTIONS")
        assert status == 204 and "Range" in head["Access-Control-Allow-Headers"]
        assert get("missing.bigWig", "bytes=0-3")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(InputError, match="is a URL"):
        make_server("s3://bucket/run")


IGV_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script src="igv.min.js"></script>
</head><body><div id="igv"></div></body></html>"""

IGV_SCRIPT = """async ([hubURL, fastaURL]) => {
    const hub = await igv.loadHub(hubURL);
    const groups = await hub.getGroupedTrackConfigurations("hg38");
    const configs = [];
    const walk = c => { configs.push(...c.tracks); (c.children || []).forEach(walk); };
    groups.forEach(walk);
    const browser = await igv.createBrowser(document.getElementById("igv"), {
        reference: {id: "hg38", name: "test", fastaURL, indexURL: fastaURL + ".fai"},
        locus: "chr10:1-2497", showCytobandTrack: false});
    const out = [];
    for (const c of configs) {
        const track = await browser.loadTrack(c);
        const feats = await track.getFeatures("chr10", 0, 2497, 1);
        out.push({name: track.name, url: c.url, color: track.color,
                  values: feats.map(f => [f.start, f.end, f.value])});
    }
    return {hub: hub.getShortLabel(), tracks: out};
}"""


@pytest.mark.skipif(not os.environ.get("EDICE_IGV_JS"),
                    reason="set EDICE_IGV_JS to igv.js's dist/igv.min.js (npm package igv) "
                           "to check the hub in IGV's web component")
def test_igv_js_reads_the_hub(tmp_path, browser, ray_local):
    """igv.js (IGV's web component) loads the hub by URL through `edice serve`, from a
    page of another origin, and reads each bigWig's values: the right file per track."""
    import threading

    from edice_dist.serve import make_server

    run = tmp_path / "run"
    data = make_run(str(run), seed=4)
    export(str(run), genome="hg38")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(os.environ["EDICE_IGV_JS"], site / "igv.min.js")
    (site / "index.html").write_text(IGV_PAGE)
    with open(site / "ref.fa", "w") as fa, open(site / "ref.fa.fai", "w") as fai:
        for name, size in CHROMS:
            head = f">{name}\n"
            fai.write(f"{name}\t{size}\t{fa.tell() + len(head)}\t{size}\t{size + 1}\n")
            fa.write(head + "N" * size + "\n")
    servers = [make_server(str(run / "bigwig"), port=0), make_server(str(site), port=0)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    hub_url, site_url = (f"http://127.0.0.1:{s.server_address[1]}/" for s in servers)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(site_url + "index.html")
        got = page.evaluate(IGV_SCRIPT, [hub_url + "hub.txt", site_url + "ref.fa"])
    finally:
        page.close()
        for s in servers:
            s.shutdown()
            s.server_close()
    assert errors == []
    assert len(got["tracks"]) == len(TARGETS)
    for t in got["tracks"]:
        k = next(i for i, r in enumerate(TARGETS) if t["url"].endswith(
            urllib.parse.quote(r["track_id"]) + ".bigWig"))
        want = np.maximum(np.sinh(data["chr10"][k].astype(np.float64)), 0)
        vals = {s // 25: v for s, e, v in t["values"]}
        assert len(vals) == len(want)
        np.testing.assert_allclose([vals[i] for i in range(len(want))], want, rtol=1e-5)
