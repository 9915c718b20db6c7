"""A real headless browser for reports: Debian's Chromium driven by Playwright (which downloads nothing)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium on a closed network: no background connections, no sandbox (root in a container), no GPU
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def _served(folder: Path) -> Iterator[str]:
    """``folder`` over real HTTP on a free localhost port."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def open_page(page_path: Path, screenshot: Path) -> dict[str, Any]:
    """Opens ``page_path`` over HTTP in headless Chromium, waits for it to load, takes a full-page screenshot;
    returns each image's source and natural size, and the page's text."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: scripts/setup.sh installs Debian's chromium where apt-get may run")
    from playwright.sync_api import sync_playwright

    with _served(page_path.parent) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/{page_path.name}", wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
                                   "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"images": images, "text": text}
