"""Screenshot the top of an evaluation report in headless Chromium (docs/report.png).

    .venv/bin/python scripts/screenshot_report.py demo/evaluation/report.html docs/report.png

Needs Playwright (a dev dependency) and a system Chromium (``apt-get install chromium``;
another one with ``--chromium PATH``). The page is drawn at ``--width`` CSS pixels and the
top ``--height`` kept, so that the PNG stays small enough for a README.
"""

from __future__ import annotations

import argparse
import os
import shutil


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--height", type=int, default=1150)
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    a = p.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        page = browser.new_page(viewport={"width": a.width, "height": a.height})
        page.goto("file://" + os.path.abspath(a.report), wait_until="load")
        page.screenshot(path=a.png, clip={"x": 0, "y": 0, "width": a.width, "height": a.height})
        browser.close()
    print(f"{a.png}: {os.path.getsize(a.png) / 1024:.0f} KB")


if __name__ == "__main__":
    main()
