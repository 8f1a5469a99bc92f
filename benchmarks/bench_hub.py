"""The track hub of a full consortium in a real browser: load times at 500 to 3,000 tracks.

    python benchmarks/bench_hub.py [--points 494:250 988:500 2000:1000] [--run DIR]
                                   [--igv-js igv.min.js] [--json OUT]

A user opens the hub of a Roadmap-sized imputation (~2,000 imputed tracks, and the ~1,000
observed ones linked beside them) in a genome browser. What must stay usable is what the
browser does with the hub: fetch and parse ``trackDb.txt``, build the track selector (one
composite per assay), draw the subtracks that are on at first, and draw a whole composite
when the user ticks all of its cell types. This measures each of those in igv.js (IGV's
web component, npm package ``igv``) in headless Chromium, the hub served by ``edice serve``
(the byte-range, CORS server a user runs), all on this machine:

- ``hub ms``: ``igv.loadHub`` (hub.txt, genomes.txt, trackDb.txt fetched and parsed);
- ``selector ms``: ``getGroupedTrackConfigurations`` (the composites and their subtracks);
- ``open ms``: a browser at a 100 kb locus with the subtracks the hub turns on (``parent
  ... on`` in trackDb.txt, read here in Python), each drawn;
- ``composite ms``: every subtrack of the largest composite loaded and drawn;
- ``JS heap MiB``: the page's used JavaScript heap after all of it.

Each point ``IMPUTED:OBSERVED`` writes a hub with the project's own writer
(:func:`edice_dist.hub.write_hub`) over Roadmap's 24 assays and ``round(3 * OBSERVED / 24)``
cell types, each track its own bigWig file (symbolic links to a few real bigWigs of one
2 Mbp chromosome, so that writing 3,000 of them takes seconds; the browser fetches each by
its own URL). ``--run DIR`` measures an exported run's hub instead (``DIR/bigwig``, e.g.
one that ``bench_consortium.py --keep`` left).

igv.js comes from ``--igv-js``, ``$EDICE_IGV_JS`` (``.ci/run`` fetches it) or the npm cache
of ``.ci/run``; Chromium from ``$EDICE_CHROMIUM`` or the path. Without either the
benchmark says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from edice_dist.hub import HubTrack, write_hub  # noqa: E402
from edice_dist.serve import HubRequestHandler, make_server  # noqa: E402

CHROM, CHROM_BP, BIN = "chr1", 2_000_000, 25
LOCUS = (CHROM, 500_000, 600_000)  # 100 kb: a locus a user looks at
ASSAYS = (  # Roadmap's 24 marks (as bench_consortium.py)
    "H3K4me3,H3K4me1,H3K36me3,H3K27me3,H3K9me3,H3K27ac,H3K9ac,DNase,H3K4me2,H2A.Z,H3K79me2,"
    "H4K20me1,H2AK5ac,H2BK120ac,H2BK12ac,H2BK15ac,H2BK20ac,H2BK5ac,H3K14ac,H3K18ac,H3K23ac,"
    "H3K4ac,H3K56ac,H3K79me1").split(",")
N_BASE = 8  # distinct bigWigs the links point at

PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script src="igv.min.js"></script>
</head><body><div id="igv" style="width:1200px"></div></body></html>"""

SCRIPT = """async ([hubURL, fastaURL, genome, onURLs, locus]) => {
    const t0 = performance.now();
    const hub = await igv.loadHub(hubURL);
    const t1 = performance.now();
    const groups = await hub.getGroupedTrackConfigurations(genome);
    const configs = [], composites = [];
    const walk = (c, top) => {
        if (c.tracks && c.tracks.length) { configs.push(...c.tracks); composites.push(c.tracks); }
        (c.children || []).forEach(k => walk(k, false));
    };
    groups.forEach(g => walk(g, true));
    const t2 = performance.now();
    const isOn = c => onURLs.some(u => c.url.endsWith(u));
    const on = configs.filter(isOn);
    const browser = await igv.createBrowser(document.getElementById("igv"), {
        reference: {id: genome, name: "bench", fastaURL, indexURL: fastaURL + ".fai"},
        locus, showCytobandTrack: false, tracks: []});
    await browser.loadTrackList(on);
    const t3 = performance.now();
    const biggest = composites.reduce((a, b) => (b.length > a.length ? b : a), []);
    const rest = biggest.filter(c => !isOn(c));
    await browser.loadTrackList(rest);
    const t4 = performance.now();
    const drawn = browser.findTracks(t => t.type === "wig").length;
    return {hub_ms: t1 - t0, selector_ms: t2 - t1, open_ms: t3 - t2, composite_ms: t4 - t3,
            subtracks: configs.length, composites: composites.length, on: on.length,
            composite_tracks: biggest.length, drawn,
            heap_mib: performance.memory ? performance.memory.usedJSHeapSize / 2 ** 20 : null};
}"""


def _base_bigwigs(folder: str, n: int) -> list[str]:
    """``n`` bigWigs of one chromosome: sparse peaks over a background, 25 bp bins."""
    import pyBigWig

    rng = np.random.default_rng(0)
    paths = []
    nb = CHROM_BP // BIN
    for k in range(n):
        v = rng.gamma(0.6, 0.5, nb).astype(np.float64)
        peaks = rng.choice(nb, nb // 200, replace=False)
        for w in range(-8, 9):
            v[np.clip(peaks + w, 0, nb - 1)] += 6 * np.exp(-(w / 4) ** 2)
        p = os.path.join(folder, f"base{k}.bigWig")
        bw = pyBigWig.open(p, "w")
        bw.addHeader([(CHROM, CHROM_BP)], maxZooms=4)
        bw.addEntries(CHROM, 0, values=v.tolist(), span=BIN, step=BIN)
        bw.close()
        paths.append(p)
    return paths


def synthetic_hub(folder: str, imputed: int, observed: int) -> str:
    """A hub of ``imputed`` + ``observed`` tracks over Roadmap's shape; returns its folder."""
    hub = os.path.join(folder, f"hub-{imputed}-{observed}")
    os.makedirs(os.path.join(hub, "observed"))
    bases = _base_bigwigs(folder, N_BASE) if not os.path.exists(
        os.path.join(folder, "base0.bigWig")) else [
        os.path.join(folder, f"base{k}.bigWig") for k in range(N_BASE)]
    cells = [f"cell{c:03d}" for c in range(max(1, round(3 * observed / len(ASSAYS))))]
    pairs = [(c, a) for c in cells for a in ASSAYS]
    random.Random(1).shuffle(pairs)
    obs, imp = pairs[:observed], pairs[observed:observed + imputed]
    tracks = []
    for i, (c, a) in enumerate(imp):
        name = f"{c}-{a}.bigWig"
        os.symlink(bases[i % N_BASE], os.path.join(hub, name))
        tracks.append(HubTrack(c, a, "imputed", name))
    for i, (c, a) in enumerate(obs):
        name = f"observed/{c}-{a}.bigWig"
        os.symlink(bases[i % N_BASE], os.path.join(hub, name))
        tracks.append(HubTrack(c, a, "observed", name))
    write_hub(hub, tracks, "hg38", name=f"bench_{imputed}")
    return hub


def on_urls(trackdb: str) -> list[str]:
    """The bigDataUrl of every subtrack that trackDb.txt turns on (``parent X on``)."""
    out, url, on = [], None, False
    with open(trackdb) as f:
        for line in list(f) + [""]:
            s = line.strip()
            if not s:
                if url and on:
                    out.append(url)
                url, on = None, False
            elif s.startswith("bigDataUrl "):
                url = s.split(None, 1)[1]
            elif s.startswith("parent "):
                on = s.split()[-1] == "on"
    return out


def reference(site: str, chroms: list[tuple[str, int]]) -> None:
    """An all-N FASTA and its index: igv.js needs a reference, not its bases."""
    with open(os.path.join(site, "ref.fa"), "w") as fa, \
            open(os.path.join(site, "ref.fa.fai"), "w") as fai:
        for name, size in chroms:
            head = f">{name}\n"
            fai.write(f"{name}\t{size}\t{fa.tell() + len(head)}\t{size}\t{size + 1}\n")
            fa.write(head + "N" * size + "\n")


def measure(browser, hub_dir: str, site: str, locus: str) -> dict:
    HubRequestHandler.log_message = lambda self, *args: None  # a line per range request
    servers = [make_server(hub_dir, port=0), make_server(site, port=0)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    hub_url, site_url = (f"http://127.0.0.1:{s.server_address[1]}/" for s in servers)
    genome = open(os.path.join(hub_dir, "genomes.txt")).read().split()[1]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(site_url + "index.html")
        t = time.perf_counter()
        got = page.evaluate(SCRIPT, [hub_url + "hub.txt", site_url + "ref.fa", genome,
                                     on_urls(os.path.join(hub_dir, "trackDb.txt")), locus])
        got["total_s"] = time.perf_counter() - t
    finally:
        page.close()
        for s in servers:
            s.shutdown()
            s.server_close()
    if errors:
        raise SystemExit(f"igv.js reported errors: {errors[:3]}")
    got["trackdb_kb"] = os.path.getsize(os.path.join(hub_dir, "trackDb.txt")) / 1e3
    return got


def find_igv_js(given: str | None) -> str | None:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "edice-ci")
    cands = [given, os.environ.get("EDICE_IGV_JS")]
    if os.path.isdir(cache):
        cands += sorted(os.path.join(cache, d, "package/dist/igv.min.js")
                        for d in os.listdir(cache))
    return next((c for c in cands if c and os.path.isfile(c)), None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["494:250", "988:500", "2000:1000"],
                    help="IMPUTED:OBSERVED tracks of each synthetic hub")
    ap.add_argument("--run", help="an exported run folder: measure its hub instead")
    ap.add_argument("--igv-js", help="igv.js's dist/igv.min.js (npm package igv)")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per hub (median kept)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    igv_js = find_igv_js(a.igv_js)
    chromium = os.environ.get("EDICE_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not igv_js or not chromium:
        print("bench_hub: needs igv.js (--igv-js, $EDICE_IGV_JS; `npm pack igv`) and Chromium "
              "($EDICE_CHROMIUM, or `apt-get install chromium`); skipped.")
        return
    from playwright.sync_api import sync_playwright

    work = tempfile.mkdtemp(prefix="bench_hub-")
    site = os.path.join(work, "site")
    os.makedirs(site)
    shutil.copy(igv_js, os.path.join(site, "igv.min.js"))
    with open(os.path.join(site, "index.html"), "w") as f:
        f.write(PAGE)
    if a.run:
        hubs = [("run", os.path.join(a.run, "bigwig"))]
        with open(os.path.join(a.run, "bigwig", "trackDb.txt")) as f:
            first = next(line.split()[1] for line in f if line.strip().startswith("bigDataUrl"))
        import pyBigWig

        bw = pyBigWig.open(os.path.join(a.run, "bigwig", first))
        chroms = list(bw.chroms().items())
        bw.close()
        c0, size = chroms[0]
        locus = f"{c0}:{max(1, size // 2 - 50_000)}-{min(size, size // 2 + 50_000)}"
    else:
        hubs = []
        for p in a.points:
            imp, obs = (int(x) for x in p.split(":"))
            hubs.append((p, synthetic_hub(work, imp, obs)))
        chroms = [(CHROM, CHROM_BP)]
        locus = f"{LOCUS[0]}:{LOCUS[1] + 1}-{LOCUS[2]}"
    reference(site, chroms)
    results = []
    try:
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=chromium, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"])
            try:
                for label, hub_dir in hubs:
                    runs = [measure(b, hub_dir, site, locus) for _ in range(a.repeat)]
                    med = {k: float(np.median([r[k] for r in runs]))
                           if isinstance(runs[0][k], float) else runs[0][k] for k in runs[0]}
                    results.append({"point": label, **med})
                    print(json.dumps(results[-1]), flush=True)
            finally:
                b.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| hub | subtracks | composites | trackDb kB | hub ms | selector ms | on at open | "
          "open ms | largest composite | composite ms | JS heap MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['point']} | {r['subtracks']:,} | {r['composites']} | "
              f"{r['trackdb_kb']:,.0f} | {r['hub_ms']:,.0f} | {r['selector_ms']:,.0f} | "
              f"{r['on']} | {r['open_ms']:,.0f} | {r['composite_tracks']} | "
              f"{r['composite_ms']:,.0f} | {r['heap_mib'] or 0:,.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(),
                       "chromium": chromium, "igv_js": igv_js, "argv": sys.argv[1:],
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
