"""The report page of `edice evaluate`: one self-contained HTML file.

Its content is checked against the evaluation's own TSV files, read and compared here
(best method per column by the metric's direction: ``mse*`` lower is better), through an
HTML parser of the standard library. Then a real headless Chromium opens the page, offline,
and must draw every plot (decoded images: naturalWidth > 0) and both tables. Chromium comes
from Debian (``apt-get install chromium``), driven by Playwright; without it the browser
test is skipped, with the reason, unless ``EDICE_REQUIRE_BROWSER=1`` (CI) makes that a
failure.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
from html.parser import HTMLParser

import pytest
from test_evaluate import tiny  # noqa: F401  (the fixture: a tiny genome, truth, store)

from edice_dist import runfolder
from edice_dist.evaluate import evaluate

# ----------------------------------------------------------------------------- parsing


class Page(HTMLParser):
    """Tables (by id: rows of (text, is_best) cells), images, and every reference to
    something outside the page."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, bool]]]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self._table = None
        self._cell = None
        self._style = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append(f"<{tag}>")
        for key in ("src", "href", "srcset", "data"):
            v = a.get(key)
            if v is not None and not v.startswith(("data:", "#")):
                self.external.append(f"{key}={v}")
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "style":
            self._style = True
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ["", "best" in (a.get("class") or "").split()]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "style":
            self._style = False

    def handle_data(self, data):
        if self._style and ("url(" in data or "@import" in data or "@font-face" in data):
            self.external.append("css: " + data.strip()[:80])
        if self._cell is not None:
            self._cell[0] += data
        self.text.append(data)


def parse_page(path) -> Page:
    p = Page()
    p.feed(open(path, encoding="utf-8").read())
    return p


def read_tsv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def lower_better(metric: str) -> bool:  # the metrics' definitions (SPEC 4): errors are mse*
    return metric.startswith("mse")


def best_of(values: dict[str, float], metric: str) -> set[str]:
    finite = {k: v for k, v in values.items() if v == v}
    if len(finite) < 2:
        return set()
    top = (min if lower_better(metric) else max)(finite.values())
    return {k for k, v in finite.items() if v == top}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def evaluated(tiny):  # noqa: F811
    """An evaluation of a run folder with its run.json, model.json and store."""
    root = tiny["root"]
    model = root / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({
        "format": "edice-model", "tool_version": "0.1.0", "kind": "train",
        "model_config": {"embed_dim": 64, "n_heads": 4}, "train_config": {"lr": 0.001},
        "epoch": 3, "epochs_run": 5, "stopped_early": True, "best_val_mse": 0.25,
        "best_val_pearson": 0.7, "val_avg_mse": 0.5, "cell_keys": ["a", "b"],
        "assays": ["A", "B"], "trained": "2026-01-02T03:04:05+00:00"}))
    runfolder.write(str(root / "run"), {
        "format": runfolder.RUN_FORMAT, "tool_version": "0.1.0", "store": tiny["store"],
        "model": str(model), "model_sha256": "ab12" * 16, "created": "2026-01-02",
        "completed": "2026-01-03", "device": "cpu", "dtype": "float32",
        "targets": [{"track_id": "c1@i1-A"}, {"track_id": "c2@i2-B"}],
        "chroms": ["chrA", "chrB"], "supports": ["x"]})
    (root / "run" / "bigwig" / "export.json").write_text('{"space": "pval"}\n')
    res = evaluate(str(root / "truth" / "targets.tsv"), str(root / "run" / "bigwig"),
                   store=tiny["store"], parallel=False, quiet=True)
    return res


# ----------------------------------------------------------------------------- content


def test_report_is_self_contained_and_complete(evaluated):
    out = evaluated["out"]
    path = os.path.join(out, "report.html")
    assert evaluated["files"]["report.html"] == path
    page = parse_page(path)
    assert page.external == [], page.external
    # Every plot of the evaluation, embedded: the decoded data URI is the PNG file.
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert len(pngs) >= 4
    assert len(page.images) == len(pngs)
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert sorted(embedded) == sorted(open(os.path.join(out, f), "rb").read() for f in pngs)


def test_summary_table_highlights_the_best_method(evaluated):
    out = evaluated["out"]
    page = parse_page(os.path.join(out, "report.html"))
    head, *rows = page.tables["summary"]
    metrics = [h.split()[0] for h, _ in head[3:]]
    summary = read_tsv(os.path.join(out, "summary.tsv"))
    assert metrics == list(dict.fromkeys(s["metric"] for s in summary))
    means = {(s["assay"], s["method"], s["metric"]): float(s["mean"]) for s in summary}
    assay, checked = None, 0
    for cells in rows:
        text = [c for c, _ in cells]
        assay = text[0] or assay
        method = text[1]
        if method.startswith("model beats"):
            base = method.split()[-1]
            for m, (c, best) in zip(metrics, cells[3:], strict=True):
                share = next(s for s in summary if (s["assay"], s["method"], s["metric"])
                             == (assay, base, m))["model_beats"]
                assert c == f"{100 * float(share):.0f}%" and not best
            continue
        methods = {me for (a, me, _) in means if a == assay}
        for m, (c, best) in zip(metrics, cells[3:], strict=True):
            assert float(c) == pytest.approx(means[(assay, method, m)], abs=5e-5)
            want = method in best_of({me: means[(assay, me, m)] for me in methods}, m)
            assert best == want, (assay, method, m)
            checked += want
    assert {c[0][0] for c in rows if c[0][0]} == {s["assay"] for s in summary}
    assert checked >= len(metrics)  # something was highlighted in every column at least


def test_track_table_has_every_row_and_highlights_per_track(evaluated):
    out = evaluated["out"]
    page = parse_page(os.path.join(out, "report.html"))
    head, *rows = page.tables["tracks"]
    names = [h.split()[0] for h, _ in head]
    assert names[:4] == ["cell", "individual", "assay", "method"]  # "cell type"
    metrics = names[4:]
    tsv = read_tsv(os.path.join(out, "metrics.tsv"))
    assert len(rows) == len(tsv)
    by_track: dict = {}
    for r in tsv:
        by_track.setdefault((r["cell_type"], r["individual"], r["assay"]), {})[r["method"]] = r
    key = None
    for cells in rows:
        text = [c for c, _ in cells]
        key = tuple(text[:3]) if text[0] else key
        rec = by_track[key][text[3]]
        for m, (c, best) in zip(metrics, cells[4:], strict=True):
            v = float(rec[m])
            assert (c == "–") if v != v else float(c) == pytest.approx(v, rel=1e-3, abs=1e-4)
            vals = {me: float(r[m]) for me, r in by_track[key].items()}
            assert best == (text[3] in best_of(vals, m)), (key, text[3], m)


def test_provenance_names_run_model_store_and_versions(evaluated, tiny):  # noqa: F811
    text = " ".join(parse_page(os.path.join(evaluated["out"], "report.html")).text)
    for want in (str(tiny["root"] / "run"), "ab12ab12", str(tiny["root"] / "model"),
                 "embed_dim=64", "lr=0.001", "best 3 of 5 run (stopped early)",
                 tiny["store"], "8 (", "edice-dist", "numpy", "zarr", "pyBigWig",
                 "truth BED when given", "promoter"):
        assert want in text, want


def test_report_of_bigwigs_outside_a_run(tiny, tmp_path):  # noqa: F811
    """Given only bigWigs (no run folder, no store, no plots), the page says what is
    unknown and still has its tables."""
    root = tiny["root"]
    bw = tmp_path / "loose"
    bw.mkdir()
    for f in os.listdir(root / "run" / "bigwig"):
        if f.endswith(".bigWig"):
            shutil.copy(root / "run" / "bigwig" / f, bw / f)
    res = evaluate(str(root / "truth" / "targets.tsv"), str(bw), out=str(tmp_path / "ev"),
                   plots=False, parallel=False, quiet=True)
    page = parse_page(res["files"]["report.html"])
    text = " ".join(page.text)
    assert page.images == [] and "No plots" in text
    assert "not in an imputation run folder" in text and "no --store" in text
    assert len(page.tables["tracks"]) == 1 + 2  # header + one model row per truth track
    assert page.external == []


# ----------------------------------------------------------------------------- a browser
# (the `browser` fixture: conftest.py)


def test_report_renders_in_a_real_browser(evaluated, browser, tmp_path):
    out = evaluated["out"]
    path = os.path.join(out, "report.html")
    n_png = len([f for f in os.listdir(out) if f.endswith(".png")])
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    requests, errors = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r):  # the page must need nothing but itself: block and record the rest
        if r.request.url.startswith("file://"):
            return r.continue_()
        requests.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    page.goto("file://" + path, wait_until="load")
    imgs = page.evaluate("""() => Array.from(document.images).map(i => ({
        complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
        shown: i.getBoundingClientRect().width}))""")
    assert len(imgs) == n_png
    for im in imgs:  # decoded, with a size, and laid out on the page
        assert im["complete"] and im["w"] > 100 and im["h"] > 100 and im["shown"] > 100, im
    tables = page.evaluate("""() => Array.from(document.querySelectorAll('table')).map(t => ({
        id: t.id, rows: t.rows.length, h: t.getBoundingClientRect().height}))""")
    rows = {t["id"]: t for t in tables}
    n_tracks = len(evaluated["rows"])
    assert rows["tracks"]["rows"] == 1 + n_tracks and rows["tracks"]["h"] > 20 * n_tracks
    assert rows["summary"]["rows"] > 3 and rows["summary"]["h"] > 60
    best = page.evaluate("""() => Array.from(document.querySelectorAll('td.best')).map(
        td => getComputedStyle(td).backgroundColor)""")
    assert best and set(best) == {"rgb(205, 236, 205)"}  # highlighted cells look highlighted
    assert page.locator("h2", has_text="Provenance").is_visible()
    assert requests == [] and errors == []
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert os.path.getsize(tmp_path / "report.png") > 10_000
    page.close()
