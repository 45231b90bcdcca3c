"""Regenerate docs/img/tensorboard.png: TensorBoard on loopback over a MemWatch run, shot with headless Chromium.

Usage (from the repository root, after a demo run)::

    memwatch demo --out runs/demo                      # or: memwatch demo --quick --out /tmp/demo_quick
    .venv/bin/python docs/tools/screenshot.py --logdir runs/demo/logs

Needs Chromium (Debian/Ubuntu: ``apt-get install chromium``; or pass ``--chromium PATH``). Everything stays on
127.0.0.1: TensorBoard listens on a free loopback port, and Chromium runs headless with a fresh profile and
its background networking, component updates and sync turned off.

The script waits until TensorBoard serves the ``memwatch/f_mem`` scalars of every run, opens the Time Series
dashboard filtered on ``--tags`` (a regular expression) and writes the PNG. It exits non-zero if TensorBoard
serves no MemWatch scalars or Chromium writes no image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

F_MEM = "memwatch/f_mem"  # lightning_memwatch.log.F_MEM (kept literal: this script runs without the package)
DEFAULT_TAGS = r"memwatch/(f_mem|fid$|tau_|generated$)"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_chromium(explicit: str | None) -> str:
    """Path of a Chromium executable (``--chromium``, else the first of CHROMIUM_NAMES on PATH)."""
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("No Chromium found: install it (Debian: `apt-get install chromium`) or pass --chromium PATH.")


def find_tensorboard() -> list[str]:
    """The tensorboard command of this Python environment."""
    beside = Path(sys.executable).with_name("tensorboard")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("tensorboard")
    if found:
        return [found]
    return [sys.executable, "-m", "tensorboard.main"]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_scalars(base: str, timeout: float, min_runs: int = 1) -> list[str]:
    """Wait until TensorBoard lists ``memwatch/f_mem`` for at least ``min_runs`` runs; return those runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            tags = get_json(f"{base}/data/plugin/scalars/tags")
            runs = sorted(run for run, run_tags in tags.items() if F_MEM in run_tags)  # type: ignore[union-attr]
            if len(runs) >= min_runs:
                points = get_json(
                    f"{base}/data/plugin/scalars/scalars?" + urllib.parse.urlencode({"run": runs[0], "tag": F_MEM})
                )
                if points:
                    return runs
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(
        f"TensorBoard at {base} served no {F_MEM} scalars within {timeout:.0f} s: is --logdir a MemWatch run?"
    )


def shoot(chromium: str, url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    """Headless Chromium screenshot of ``url`` into ``out`` (fresh profile, loopback only)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memwatch-chromium-") as profile:
        tmp_png = Path(profile) / "shot.png"
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={tmp_png}",
            url,
        ]
        subprocess.run(cmd, check=False, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not tmp_png.exists() or tmp_png.stat().st_size == 0:
            raise SystemExit(f"Chromium wrote no screenshot (command: {' '.join(cmd)})")
        shutil.copyfile(tmp_png, out)


def shoot_unclipped(url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    """The CUSTOM SCALARS page with *Ignore outliers in chart scaling* unticked (a setting TensorBoard keeps in
    the browser's local storage, so a plain ``--screenshot`` cannot change it), through chromedriver."""
    from browser import Browser  # docs/tools/browser.py, beside this script

    with Browser(width, height) as browser:
        browser.open(url)
        time.sleep(2)
        browser.run_script("window.localStorage.setItem('_ignoreYOutliers', 'false');")
        browser.open(url.replace("#", "?reload#", 1))
        time.sleep(budget_ms / 1000)
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(out)


def dashboard_url(base: str, tags: str, dashboard: str = "timeseries") -> str:
    """The Time Series dashboard filtered on ``tags`` (no smoothing, light theme, SVG charts: no WebGL headless),
    or MemWatch's CUSTOM SCALARS layout with smoothing off (the link the docs give)."""
    if dashboard == "custom_scalars":
        return f"{base}/#custom_scalars&_smoothingWeight=0"
    query = urllib.parse.urlencode({"darkMode": "false", "forceSVG": "true", "smoothing": "0", "tagFilter": tags})
    return f"{base}/?{query}#timeseries"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", required=True, help="TensorBoard log directory of a MemWatch run")
    parser.add_argument("--out", default="docs/img/tensorboard.png", help="PNG to write")
    parser.add_argument("--tags", default=DEFAULT_TAGS, help="tag filter (regular expression)")
    parser.add_argument(
        "--dashboard", choices=("timeseries", "custom_scalars"), default="timeseries",
        help="Time Series filtered on --tags, or MemWatch's CUSTOM SCALARS layout",
    )
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--wait", type=float, default=90.0, help="seconds to wait for TensorBoard's data")
    parser.add_argument("--min-runs", type=int, default=1, help="runs to wait for (e.g. 4 for the full demo)")
    parser.add_argument("--render-ms", type=int, default=20000, help="Chromium virtual time budget (ms)")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: found on PATH)")
    args = parser.parse_args(argv)

    logdir = Path(args.logdir)
    if not logdir.is_dir():
        raise SystemExit(f"--logdir {logdir} is not a directory.")
    chromium = find_chromium(args.chromium)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    server = subprocess.Popen(
        [
            *find_tensorboard(),
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval=0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        runs = wait_for_scalars(base, args.wait, args.min_runs)
        time.sleep(5)  # the runs' other tags (images, the layout) finish loading
        url = dashboard_url(base, args.tags, args.dashboard)
        if args.dashboard == "custom_scalars" and shutil.which("chromedriver"):
            shoot_unclipped(url, Path(args.out), args.width, args.height, args.render_ms)
        else:
            shoot(chromium, url, Path(args.out), args.width, args.height, args.render_ms)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"wrote {args.out} ({len(runs)} run(s) with {F_MEM}: {', '.join(runs)}; page {url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
