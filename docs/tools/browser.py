"""A real browser for TensorBoard: headless Chromium driven over chromedriver's W3C WebDriver HTTP API (urllib
only, no selenium), and a TensorBoard server on a free loopback port. Used by ``screenshot.py`` (the CUSTOM
SCALARS shot) and by the real-browser test in ``tests/test_docs.py``."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# every text node and input value of the page, through shadow roots (TensorBoard's Polymer dashboards)
DEEP_TEXT = """
const out = [];
function walk(n) {
  if (n.nodeType === 3) { out.push(n.textContent); return; }
  if (n.nodeType === 1 && (n.tagName === 'STYLE' || n.tagName === 'SCRIPT')) return;
  if (n.nodeType === 1 && n.tagName === 'INPUT') out.push('[input=' + n.value + ']');
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.childNodes) walk(c);
}
walk(document);
return out.join(' ').replace(/\\s+/g, ' ');
"""
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _json(method: str, url: str, body: Any = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class TensorBoard:
    """``tensorboard --logdir LOGDIR`` on 127.0.0.1 (a context manager); waits until it serves ``tag``."""

    def __init__(self, logdir: Path, tag: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        beside = Path(sys.executable).with_name("tensorboard")
        program = [str(beside)] if beside.exists() else [sys.executable, "-m", "tensorboard.main"]
        self.proc = subprocess.Popen(
            [*program, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--reload_interval", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                served = _json("GET", f"{self.url}/data/plugin/scalars/tags", timeout=5)
                if any(tag in tags for tags in served.values()):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"TensorBoard served no {tag} within 90 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Browser:
    """Headless Chromium (fresh profile, loopback only) behind chromedriver; a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        chromium = next(path for name in CHROMIUM_NAMES if (path := shutil.which(name)))
        driver = shutil.which("chromedriver")
        if driver is None:
            raise RuntimeError("no chromedriver (Debian: apt-get install -y chromium-driver)")
        self.port = free_port()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.proc = subprocess.Popen([driver, f"--port={self.port}"], **quiet)  # type: ignore[call-overload]
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                _json("GET", f"{self.base}/status", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        self.profile = tempfile.mkdtemp(prefix="memwatch-chromium-")
        args = ["--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
                f"--user-data-dir={self.profile}", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-extensions", "--force-device-scale-factor=1"]
        options = {"binary": chromium, "args": args}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = _json("POST", f"{self.base}/session", caps)["value"]["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return _json(method, f"{self.base}/session/{self.session}{path}", body)["value"]

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def text(self) -> str:
        """The page's text, shadow DOM included."""
        return str(self.run_script(DEEP_TEXT))

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """The page's text once it holds every needle; raises AssertionError with what is missing."""
        deadline = time.time() + timeout
        text = ""
        while time.time() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(1)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"the page never showed {missing}; it shows: {text[:1500]}")

    def run_script(self, script: str) -> Any:
        """Run JavaScript in the page; returns its value."""
        return self._call("POST", "/execute/sync", {"script": script, "args": []})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))

    def close(self) -> None:
        try:
            _json("DELETE", f"{self.base}/session/{self.session}", timeout=20)
        finally:
            self.proc.terminate()
            self.proc.wait(20)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
