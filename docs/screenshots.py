#!/usr/bin/env python3
"""Render the TensorBoard screenshots shown in docs/tensorboard.md from a real run folder.

`vit-train` writes its TensorBoard event files into the run folder. This script starts
TensorBoard on that folder, opens each dashboard in headless Chromium, waits until the
dashboard has drawn its data (not a loading spinner), and saves one PNG per tab:

    docs/tensorboard_timeseries.png   Time Series (scalar charts)
    docs/tensorboard_scalars.png      legacy Scalars dashboard
    docs/tensorboard_images.png       Images
    docs/tensorboard_text.png         Text
    docs/tensorboard_hparams.png      HParams (table view, its default columns, metrics shown)

Requirements
------------
* TensorBoard, installed with the project's dependencies (tested with TensorBoard 2.21).
* Playwright for Python, in the project's `docs` extra: `pip install -e ".[docs]"`. It drives
  the system's Chromium; its own browser download (`playwright install`) is not needed.
* Chromium (or Google Chrome). On Debian/Ubuntu:

      sudo apt-get install -y chromium fonts-dejavu-core

  (`chromium-browser` on some Ubuntu releases). Any chromium/chrome on PATH is found;
  `--chromium PATH` picks one explicitly. No display server is needed.
* Pillow (optional) to recompress the PNGs losslessly.

Usage
-----
    vit-train -m optimizer.lr=1e-3,3e-4 trainer.epochs=8 hydra.sweep.dir=runs/readme
    python docs/screenshots.py runs/readme --out docs/ --tabs timeseries,hparams --smoothing 0
    python docs/screenshots.py runs/readme/0 --out docs/ --tabs images,text --height 1400

Useful options: `--tabs timeseries,images` (a subset), `--width/--height` (viewport in
CSS pixels, default 1280x800), `--wait` (seconds to wait for each dashboard's data),
`--tag-filter` (regex for the scalar charts shown), `--smoothing` (scalar smoothing; the
Time Series dashboard fits its y axis to the smoothed curve, so for a run of a few epochs
`--smoothing 0` shows the data best), `--hparams` (HParams table columns, e.g. `'core.*'`),
`--skip-empty` (skip tabs the run has no data for, instead of saving the dashboard's
"no data" page).
The script exits with status 1 if a dashboard did not finish loading within `--wait`.

How it works
------------
TensorBoard is started on 127.0.0.1 with a free port and stopped at the end. Playwright
launches the Chromium found (`executable_path`) headless. For each tab the page is polled
until its content is drawn (charts have lines, images have loaded, text cards are rendered,
the HParams table has a row) and nothing is spinning; then, after a short settle time, the
viewport is captured. The page is set up the way a user would set it up: Time Series charts
are drawn as SVG (TensorBoard's `forceSVG` flag; its WebGL charts stay blank in a browser
without a GPU) with the settings pane closed; "Ignore outliers in chart scaling" is off, so
that short runs show their whole curve (both are stored settings, written before the page
loads); in HParams only the `--hparams` columns are ticked and the first row's "Show Metrics"
box is checked, by clicking them once the table is there, and the table's columns and metrics
panel are sized to their contents so that they are not cut off.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

TABS = ("timeseries", "scalars", "images", "text", "hparams")

# Which TensorBoard plugins hold the data a tab shows (from /data/plugins_listing).
TAB_PLUGINS = {
    "timeseries": ("scalars", "images", "histograms"),
    "scalars": ("scalars",),
    "images": ("images",),
    "text": ("text",),
    "hparams": ("hparams",),
}

DEFAULT_TAG_FILTER = r"^(train|val)/"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = 'error: Playwright is not installed; pip install -e ".[docs]"'


# --------------------------------------------------------------------------------------
# JavaScript run in the page: the prelude, then one expression per tab returning
# {ready: bool, note: str}, wrapped in a function. `OPT` holds the options, `S` is state
# kept in the page across polls.
# --------------------------------------------------------------------------------------

JS_PRELUDE = r"""
const OPT = __OPT__;
const S = window.__tbShots || (window.__tbShots = {});
// querySelectorAll through every shadow root below `root` (TensorBoard mixes Angular and
// Polymer; the Polymer dashboards keep their content in shadow DOM).
const deep = (sel, root) => {
  const out = [];
  const walk = (r) => {
    out.push(...r.querySelectorAll(sel));
    for (const e of r.querySelectorAll('*')) if (e.shadowRoot) walk(e.shadowRoot);
  };
  root = root || document;
  if (root.shadowRoot) walk(root.shadowRoot);
  walk(root);
  return out;
};
const inView = (e) => {
  const r = e.getBoundingClientRect();
  return r.width > 0 && r.height > 0 && r.bottom > 0 && r.right > 0
      && r.top < innerHeight && r.left < innerWidth;
};
const SPINNERS = 'mat-spinner, mat-progress-spinner, mat-progress-bar, '
                + 'paper-spinner-lite[active], paper-spinner[active]';
const spinning = () => deep(SPINNERS).filter(inView).length > 0;
const result = (ready, note) => (
  spinning() ? {ready: false, note: 'spinner visible'} : {ready: ready, note: note});
const byText = (sel, re) => deep(sel).filter((e) => re.test(e.textContent || ''));
"""

# Run before TensorBoard's own scripts: its stored settings, as a user would leave them.
# Time Series reads `_tb_global_settings`; the legacy Scalars dashboard `_ignoreYOutliers`.
# Both charts fit their axes when the data arrives, so clicking the boxes later is too late.
JS_SETTINGS = r"""
try {
  const settings = JSON.parse(localStorage.getItem('_tb_global_settings') || '{}');
  Object.assign(settings, __SETTINGS__);
  localStorage.setItem('_tb_global_settings', JSON.stringify(settings));
  localStorage.setItem('_ignoreYOutliers', __IGNORE_OUTLIERS__);
} catch (e) {}  // about:blank has no storage
"""

# A tab whose plugin has no data: wait for its dashboard to be drawn, whatever it says.
JS_EMPTY = r"""
(() => {
  const shell = deep('metrics-dashboard, tf-scalar-dashboard, tf-image-dashboard, '
                   + 'tf-text-dashboard, tf-hparams-dashboard').length > 0;
  const message = byText('div, p, span, h3', /No .*(data|dashboards)/i).some(inView);
  return result(shell || message, 'empty dashboard');
})()
"""

JS_TABS = {
    "timeseries": r"""
(() => {
  // Settings pane: show the whole curve, then close the pane to give the charts the room.
  // The settings are set before the page loads (see JS_SETTINGS); close the pane if it shows.
  const toggle = deep('button[aria-label="Toggle settings side pane"]')[0];
  if (toggle && toggle.classList.contains('checked')) {
    toggle.click();
    return result(false, 'closing settings pane');
  }
  const cards = deep('scalar-card, image-card, histogram-card').filter(inView);
  if (!cards.length) return result(false, 'no cards yet');
  for (const card of cards) {
    const kind = card.tagName.toLowerCase();
    if (kind === 'scalar-card'
        && !card.querySelector(
          '.series-view svg path, .series-view svg circle, .series-view canvas'))
      return result(false, 'scalar chart without data');
    if (kind === 'image-card') {
      const imgs = deep('img', card);
      if (!imgs.length || imgs.some((i) => !i.complete || !i.naturalWidth))
        return result(false, 'image loading');
    }
    if (kind === 'histogram-card' && !deep('path, canvas', card).length)
      return result(false, 'histogram loading');
  }
  return result(true, cards.length + ' cards');
})()
""",
    "scalars": r"""
(() => {
  if (!OPT.ignoreOutliers) {
    const box = byText('paper-checkbox', /Ignore outliers/i)[0];
    if (box && box.checked) { box.click(); return result(false, 'outliers setting'); }  // fallback
  }
  const cards = deep('tf-scalar-card').filter(inView);
  if (!cards.length) return result(false, 'no charts yet');
  const loaders = deep('tf-line-chart-data-loader').filter(inView);
  if (loaders.some((l) => l.dataLoading !== false)) return result(false, 'charts loading');
  const drawn = deep('vz-line-chart2').filter(inView).some(
    (c) => deep('path.line', c).some((p) => (p.getAttribute('d') || '').length > 0));
  return result(drawn, drawn ? cards.length + ' charts' : 'no line drawn yet');
})()
""",
    "images": r"""
(() => {
  const loaders = deep('tf-image-loader').filter(inView);
  if (!loaders.length) return result(false, 'no image cards yet');
  for (const l of loaders) {
    const imgs = deep('img', l);
    if (!imgs.length || imgs.some((i) => !i.complete || !i.naturalWidth))
      return result(false, 'image loading');
  }
  return result(true, loaders.length + ' image cards');
})()
""",
    "text": r"""
(() => {
  const loaders = deep('tf-text-loader').filter(inView);
  if (!loaders.length) return result(false, 'no text cards yet');
  if (loaders.some((l) => !deep('tf-markdown-view', l).length))
    return result(false, 'text loading');
  return result(true, loaders.length + ' text cards');
})()
""",
    "hparams": r"""
(() => {
  const pane = deep('tf-hparams-query-pane')[0];
  const table = deep('tf-hparams-table-view')[0];
  if (!pane || !table) return result(false, 'no hparams dashboard yet');
  const boxes = deep('paper-checkbox', pane).filter(
    (c) => c.parentElement && c.parentElement.classList.contains('hparam'));
  if (!boxes.length) return result(false, 'no hparams yet');
  // Tick only the wanted columns (if any of them exist); TensorBoard ticks the first few.
  if (!S.columns) {
    S.columns = true;
    const patterns = OPT.hparams.map((p) => new RegExp(p));
    const wanted = (c) => patterns.some((p) => p.test(c.textContent.trim()));
    if (boxes.some(wanted)) {
      for (const c of boxes) if (c.checked !== wanted(c)) c.click();
      return result(false, 'choosing columns');
    }
  }
  const rows = deep('paper-checkbox.table-cell', table).filter(inView);
  if (!rows.length) return result(false, 'no table rows yet');
  if (OPT.hparamsMetrics && !S.metrics) {
    S.metrics = true;
    if (!rows[0].checked) { rows[0].click(); return result(false, 'showing metrics'); }
  }
  if (OPT.hparamsMetrics) {
    const charts = deep('vz-line-chart2', table).filter(inView);
    if (!charts.length) return result(false, 'metric charts not drawn yet');
    const drawn = charts.some(
      (c) => deep('path.line', c).some((p) => (p.getAttribute('d') || '').length > 0));
    if (!drawn) return result(false, 'metric charts loading');
  }
  if (!S.resized) {
    S.resized = true;
    // The metrics panel is a 360 px high scrolling box, which cuts off a third row of
    // charts: let it take the height of its charts.
    for (const d of deep('tf-hparams-session-group-details', table)) {
      d.style.height = 'auto';
      d.style.overflow = 'visible';
    }
    // Columns are 160 px wide each: size them to their contents so that more fit.
    for (const g of deep('vaadin-grid', table)) {
      for (const c of g.querySelectorAll('vaadin-grid-column')) c.autoWidth = true;
      if (g.recalculateColumnWidths) g.recalculateColumnWidths();
      if (g.notifyResize) g.notifyResize();
    }
    return result(false, 'fitting the table');
  }
  return result(true, rows.length + ' rows');
})()
""",
}


def tab_url(base: str, tab: str, tag_filter: str | None, smoothing: float | None) -> str:
    """The dashboard's address; Time Series and Scalars take filter and smoothing from it."""
    if tab == "timeseries":
        query = {"forceSVG": "true"}  # SVG charts: the WebGL ones stay blank without a GPU
        if tag_filter:
            query["tagFilter"] = tag_filter
        if smoothing is not None:
            query["smoothing"] = f"{smoothing:g}"
        return f"{base}/?{urllib.parse.urlencode(query)}#timeseries"
    if tab == "scalars":
        state = ""
        if tag_filter:
            state += f"&tagFilter={urllib.parse.quote(tag_filter, safe='')}"
        if smoothing is not None:
            state += f"&_smoothingWeight={smoothing:g}"
        return f"{base}/#scalars{state}"
    return f"{base}/#{tab}"


# --------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_command() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        exe = shutil.which("tensorboard")
        if not exe:
            sys.exit("error: TensorBoard is not installed (pip install tensorboard)")
        return [exe]
    return [sys.executable, "-m", "tensorboard.main"]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started in its own session, and whatever it started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # leader gone; make sure no helper outlives it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def tensorboard(logdir: Path, port: int, wait: float, log_path: Path):
    cmd = tensorboard_command() + [
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait
        previous = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"TensorBoard exited with code {proc.returncode}:\n{tail(log_path)}"
                )
            listing = None
            with contextlib.suppress(OSError, ValueError):
                if get_json(f"{base}/data/runs"):
                    listing = get_json(f"{base}/data/plugins_listing")
            # Ready once it serves a run and the set of plugins with data stopped changing.
            if listing is not None:
                enabled = sorted(k for k, v in listing.items() if v.get("enabled"))
                if enabled == previous:
                    yield base, listing
                    return
                previous = enabled
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"TensorBoard found no runs in {logdir} within {wait:.0f} s "
                    f"(no event files there?)\n{tail(log_path)}"
                )
            time.sleep(1.0)
    finally:
        stop(proc)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --------------------------------------------------------------------------------------
# Chromium, through Playwright
# --------------------------------------------------------------------------------------


def find_chromium(explicit: str | None) -> str:
    if explicit:
        path = shutil.which(explicit) or explicit
        if not os.access(path, os.X_OK):
            sys.exit(f"error: {explicit} is not an executable")
        return path
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(
        "error: Chromium not found; install it (Debian/Ubuntu: apt-get install chromium) "
        "or pass --chromium PATH"
    )


def capture(page, url: str, script: str, wait: float, settle: float) -> tuple[bytes, str, bool]:
    """Load `url`, poll `script` until the page is ready and stays ready, take the shot."""
    page.goto(url, wait_until="commit")
    deadline = time.monotonic() + wait
    note, ready_since = "page loading", None
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        state = page.evaluate(script) or {}
        note = state.get("note", note)
        if not state.get("ready"):
            ready_since = None
        elif ready_since is None:
            ready_since = time.monotonic()
        elif time.monotonic() - ready_since >= settle:  # animations and late redraws
            return page.screenshot(type="png"), note, True
    return page.screenshot(type="png"), note, False


def glob_regex(pattern: str) -> str:
    """A JavaScript regex for a name pattern where * and ? are wildcards."""
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern]
    return "^" + "".join(parts) + "$"


def write_png(path: Path, data: bytes) -> None:
    try:
        from PIL import Image
    except ImportError:
        path.write_bytes(data)
        return
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", optimize=True)
    path.write_bytes(min(buffer.getvalue(), data, key=len))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Screenshot each TensorBoard dashboard of a vit-train run folder "
        "(headless Chromium, driven by Playwright)."
    )
    p.add_argument("run_dir", type=Path, help="run folder holding the TensorBoard event files")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder for tensorboard_<tab>.png (default: the folder of this script)",
    )
    p.add_argument(
        "--tabs",
        default=",".join(TABS),
        help=f"comma-separated tabs to capture, from {','.join(TABS)} (default: all)",
    )
    p.add_argument(
        "--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)"
    )
    p.add_argument(
        "--height", type=int, default=800, help="viewport height in CSS pixels (default 800)"
    )
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for TensorBoard, and for each dashboard's data (default 60)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=1.5,
        help="seconds a dashboard must stay ready before the shot (default 1.5)",
    )
    p.add_argument(
        "--tag-filter",
        default=DEFAULT_TAG_FILTER,
        help=f"regex of the scalar tags on Time Series and Scalars (default {DEFAULT_TAG_FILTER!r};"
        " '' for all)",
    )
    p.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="scalar smoothing, 0 to 0.999 (default: TensorBoard's, 0.6)",
    )
    p.add_argument(
        "--hparams",
        default="",
        help="comma-separated HParams table columns; * and ? are wildcards, as in 'core.*' "
        "(default: TensorBoard's choice, the first five: the keys set on the command line, "
        "then core.*)",
    )
    p.add_argument(
        "--no-hparams-metrics",
        dest="hparams_metrics",
        action="store_false",
        help="do not tick 'Show Metrics' on the first HParams row",
    )
    p.add_argument(
        "--ignore-outliers",
        action="store_true",
        help="keep TensorBoard's 'Ignore outliers in chart scaling' (off by default here)",
    )
    p.add_argument(
        "--skip-empty",
        action="store_true",
        help="skip tabs the run has no data for (default: save the empty dashboard)",
    )
    p.add_argument("--port", type=int, default=0, help="TensorBoard port (default: a free one)")
    p.add_argument("--chromium", help="Chromium/Chrome executable (default: first found on PATH)")
    args = p.parse_args(argv)
    args.tabs = [t.strip() for t in args.tabs.split(",") if t.strip()]
    unknown = [t for t in args.tabs if t not in TABS]
    if unknown:
        p.error(f"unknown tab(s) {', '.join(unknown)}; choose from {', '.join(TABS)}")
    if not args.run_dir.is_dir():
        p.error(f"{args.run_dir} is not a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit(INSTALL_HINT)
    chromium = find_chromium(args.chromium)
    args.out.mkdir(parents=True, exist_ok=True)
    options = {
        "ignoreOutliers": args.ignore_outliers,
        "hparams": [glob_regex(h.strip()) for h in args.hparams.split(",") if h.strip()],
        "hparamsMetrics": args.hparams_metrics,
    }
    prelude = JS_PRELUDE.replace("__OPT__", json.dumps(options))
    settings = {"ignoreOutliers": args.ignore_outliers, "timeSeriesSettingsPaneOpened": False}
    before_load = JS_SETTINGS.replace("__SETTINGS__", json.dumps(settings)).replace(
        "__IGNORE_OUTLIERS__", json.dumps(json.dumps(args.ignore_outliers))
    )
    started = time.monotonic()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="tensorboard-shots-") as tmp:
        port = args.port or free_port()
        log = Path(tmp) / "tensorboard.log"
        with (
            tensorboard(args.run_dir.resolve(), port, args.wait, log) as (base, plugins),
            sync_playwright() as playwright,
        ):
            print(f"TensorBoard on {base} ({time.monotonic() - started:.1f} s)")
            try:
                browser = playwright.chromium.launch(
                    executable_path=chromium,
                    args=["--disable-gpu", "--hide-scrollbars", "--force-color-profile=srgb"],
                )
            except PlaywrightError as error:
                raise RuntimeError(f"Chromium ({chromium}) did not start: {error}") from None
            try:
                context = browser.new_context(
                    viewport={"width": args.width, "height": args.height},
                    device_scale_factor=1,
                    locale="en-US",
                )
                context.add_init_script(before_load)
                for tab in args.tabs:
                    t0 = time.monotonic()
                    has_data = any(
                        plugins.get(name, {}).get("enabled") for name in TAB_PLUGINS[tab]
                    )
                    if not has_data and args.skip_empty:
                        print(f"  {tab:<10} skipped: no {tab} data in {args.run_dir}")
                        continue
                    body = (JS_TABS[tab] if has_data else JS_EMPTY).strip()
                    script = f"(() => {{{prelude}\nreturn {body};\n}})()"
                    url = tab_url(base, tab, args.tag_filter, args.smoothing)
                    page = context.new_page()  # a fresh page: the scripts keep state in it
                    try:
                        png, note, ok = capture(page, url, script, args.wait, args.settle)
                    finally:
                        page.close()
                    path = args.out / f"tensorboard_{tab}.png"
                    write_png(path, png)
                    status = "ok" if ok else f"NOT READY after {args.wait:.0f} s"
                    empty = "" if has_data else " (no data: empty dashboard)"
                    print(
                        f"  {tab:<10} {status}{empty}: {note}; {path} "
                        f"({path.stat().st_size // 1024} KiB, {time.monotonic() - t0:.1f} s)"
                    )
                    failures += not ok
            except PlaywrightError as error:  # a page script failed, or Chromium went away
                raise RuntimeError(f"Chromium: {error}") from None
            finally:
                browser.close()
    print(f"done in {time.monotonic() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, TimeoutError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(130)
