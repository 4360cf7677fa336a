"""Render a page in headless Chromium (Debian's package): what images it loaded,
and a screenshot. ``.ci/run`` installs Chromium and sets FEDTUNE_REQUIRE_CHROMIUM=1,
so there a missing browser fails the test instead of skipping it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

# Flags for a closed network and a root user (no sandbox), from the machine notes.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
CHECK = ('<script>window.addEventListener("load",()=>{document.body.setAttribute('
         '"data-images",JSON.stringify([...document.images].map(i=>[i.naturalWidth,'
         'i.naturalHeight,i.complete])))});</script>')


def chromium() -> str:
    """The browser's path; skips (or fails, in CI) when it is not installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("FEDTUNE_REQUIRE_CHROMIUM") == "1":
        pytest.fail("Chromium is not installed (apt-get install chromium)")
    pytest.skip("Chromium is not installed (apt-get install chromium)")


def _run(args: list[str], tmp: Path, timeout: float = 90) -> str:
    proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={tmp}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # stop the browser and its helpers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"chromium exited {proc.returncode}"
    return out


def loaded_images(page: Path, tmp: Path) -> list[list[int | bool]]:
    """[naturalWidth, naturalHeight, complete] of every <img> once the page loaded
    (a copy of the page with a probe script; the page itself has none)."""
    probe = tmp / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", CHECK + "</body>"), encoding="utf-8")
    dom = _run(["--dump-dom", probe.as_uri()], tmp / "profile-dom")
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, "the page did not finish loading in Chromium"
    return json.loads(found.group(1).replace("&quot;", '"'))


def screenshot(page: Path, out: Path, tmp: Path, *, size: str = "1200,2600"
               ) -> Path:
    """A PNG of the page as Chromium paints it."""
    _run([f"--window-size={size}", f"--screenshot={out}", page.as_uri()],
         tmp / "profile-shot")
    assert out.is_file() and out.stat().st_size > 0
    return out
