"""A screenshot of a report page in headless Chromium (Debian's ``chromium`` through Playwright's
``executable_path``; no browser download):

    python -m instaflow_edge.report.screenshot REPORT/report.html OUT.png [--width 1000] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError, require


def screenshot(page_path: str | Path, png: str | Path, width: int = 1000, height: int = 900,
               chromium: str = "/usr/bin/chromium", full_page: bool = True) -> list[str]:
    """Save a screenshot of ``page_path``; returns the console errors the page logged (none expected)."""
    sync_api = require("playwright.sync_api", "browser")
    if not Path(chromium).is_file():
        raise InputError(f"{chromium} is missing", "install Debian's chromium (apt-get install chromium), or pass --chromium PATH")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(Path(page_path).resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(png), full_page=full_page)
        finally:
            browser.close()
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m instaflow_edge.report.screenshot", description=__doc__.split("\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--viewport-only", action="store_true", help="only the first screen, not the full page")
    a = ap.parse_args(argv)
    errors = screenshot(a.page, a.png, a.width, a.height, a.chromium, full_page=not a.viewport_only)
    print(f"wrote {a.png}" + (f"; console errors: {errors}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
