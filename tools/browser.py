"""Open a minielm HTML report in headless Chromium: its self-test, or a screenshot.

    python tools/browser.py report.html                      # run the page's self-test, print its result
    python tools/browser.py report.html --screenshot out.png # and save what it looks like

The page's own script does the checking (minielm/report.py, SELFTEST): opened as
`report.html#selftest` it clicks a token other than the one shown and writes into
<pre id="selftest"> which panel was visible before and after, and every error or
blocked fetch it saw. `--dump-dom` prints the DOM after the page's scripts ran, so no
DevTools client is needed. Debian's package is `chromium`.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         "--virtual-time-budget=5000"]  # run the page's timers and load events before dumping


def chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)


def selftest(page: Path) -> dict:
    """The page's self-test result: {before, clicked, after, selected, panels, errors}."""
    done = subprocess.run([chromium(), *FLAGS, "--dump-dom", Path(page).resolve().as_uri() + "#selftest"],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="selftest">(.*?)</pre>', done.stdout, re.S)
    if found is None:
        raise RuntimeError(f"no self-test result in the DOM (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1700) -> None:
    subprocess.run([chromium(), *FLAGS, f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}",
                    Path(page).resolve().as_uri()], capture_output=True, timeout=120, check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("--screenshot", metavar="PNG")
    args = parser.parse_args()
    print(json.dumps(selftest(args.page)))
    if args.screenshot:
        screenshot(args.page, args.screenshot)
