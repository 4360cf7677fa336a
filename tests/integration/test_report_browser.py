"""The report page as a real browser shows it (headless Chromium)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.server.tools import report
from tests.integration import browser
from tests.server.test_report import troubled_run  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def plot_colours(shot: Path) -> set[tuple[int, int, int]]:
    """The report's plot colours that appear in a screenshot."""
    from PIL import Image

    want = {(0x15, 0x65, 0xC0), (0x2E, 0x7D, 0x32), (0xC6, 0x28, 0x28),
            (0xEF, 0x6C, 0x00)}  # loss line, accepted, rejected/target, declined
    pixels = set(Image.open(shot).convert("RGB").getdata())
    return want & pixels


def test_every_plot_loads_and_paints_in_chromium(troubled_run: Path,  # noqa: F811
                                                 tmp_path: Path) -> None:
    # Prepare
    page, _ = report.write_report(troubled_run)
    # Execute
    images = browser.loaded_images(page, tmp_path)
    shot = browser.screenshot(page, tmp_path / "shot.png", tmp_path)
    # Assert: five images decoded at their full size, and their colours painted
    assert len(images) == 5
    assert all(w == 792 and h == 396 and done for w, h, done in images), images
    assert len(plot_colours(shot)) == 4
