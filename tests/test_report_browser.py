"""The HTML report opened in headless Chromium (dala_model.report.browser), as a reader opens it.

Runs wherever Playwright and a Chromium are installed (Debian's ``chromium``, or
``$DALA_CHROMIUM``) and is skipped, saying which is missing, where they are not. The reports are
real ones, built from the run folders tests/test_report.py writes.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dala_model import storage
from dala_model.report.browser import (
    OVERFLOW_TOLERANCE_PX,
    SCREENSHOT,
    WIDTH,
    BrowserUnavailable,
    check_report,
    find_chromium,
    main,
)
from dala_model.report.build import build_report
from tests.test_report import _write_all, write_planted_root


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (the dev extra: pip install -e '.[dev]')")
    try:
        return find_chromium()
    except BrowserUnavailable as exc:
        pytest.skip(str(exc))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.verify()
    return image.size


def test_report_renders_in_chromium(chromium, storage_root) -> None:
    """Every figure decodes, no console or page error, no horizontal scroll at 1366 px; the
    screenshot lands beside the report (on S3 too: the page is read from a local copy)."""
    _write_all(storage_root)
    written = build_report(storage_root)
    figures = [name for name in written if name.endswith(".png")]

    check = check_report(written["report.html"])

    assert check.ok, check.summary()
    assert check.images == len(figures) == 8
    assert check.broken_images == [] and check.console_errors == [] and check.page_errors == []
    assert check.dialogs == [] and check.blocked_requests == []
    assert check.client_width == WIDTH
    assert check.scroll_width <= check.client_width + OVERFLOW_TOLERANCE_PX
    assert check.screenshot == storage.join(storage_root, "reports", SCREENSHOT)
    width, height = _png_size(storage.read_bytes(check.screenshot))
    assert width == WIDTH and height > 3 * 768  # the full page, not the first screen


def test_planted_markup_stays_inert_in_the_browser(chromium, tmp_path) -> None:
    """A run id, model option and image ids written as an <img onerror> payload: no dialog
    fires and the page has exactly the report's own figures as images."""
    root = str(tmp_path / "root")
    write_planted_root(root)
    written = build_report(root)
    check = check_report(written["report.html"], screenshot_to=str(tmp_path / "shot.png"))
    assert check.dialogs == [], check.summary()
    assert check.images == sum(name.endswith(".png") for name in written)
    assert check.ok, check.summary()
    assert _png_size((tmp_path / "shot.png").read_bytes())[0] == WIDTH


def test_a_broken_page_fails_the_check(chromium, tmp_path) -> None:
    """The check can fail: a broken image, a script's console.error, a page too wide, a request
    off the page and a dialog are each reported, and the command exits 1."""
    root = str(tmp_path / "root")
    from tests.test_report import _write_run

    _write_run(root, "resnet50", 40, 0)
    page = Path(build_report(root)["report.html"])
    broken = tmp_path / "broken"
    shutil.copytree(page.parent, broken)
    planted = (
        '<img src="missing.png" alt="planted-missing">'
        '<img src="https://example.invalid/x.png" alt="planted-remote">'
        '<div style="width: 3000px">too wide</div>'
        "<script>console.error('planted console error'); alert('planted dialog');</script>"
    )
    html = (broken / "report.html").read_text()
    (broken / "report.html").write_text(html.replace("</body>", planted + "</body>"))

    check = check_report(str(broken / "report.html"))

    assert not check.ok
    assert check.broken_images == ["planted-missing", "planted-remote"]
    assert "planted console error" in check.console_errors
    assert check.blocked_requests == ["https://example.invalid/x.png"]
    assert check.dialogs == ["alert: planted dialog"]
    assert check.overflows and check.scroll_width > 3000 > check.client_width
    assert any("3000 px" in line for line in check.overflowing)
    assert (broken / SCREENSHOT).stat().st_size > 0  # saved even when the check fails
    assert main([str(broken / "report.html")]) == 1


def test_command_line(chromium, tmp_path, capsys) -> None:
    """`python -m dala_model.report.browser REPORT` (make report-check): 0 on a good report,
    2 with a message naming the file when there is none."""
    root = str(tmp_path / "root")
    from tests.test_report import _write_run

    _write_run(root, "dalaresnet50", 100, 0)
    report = build_report(root)["report.html"]
    command = [sys.executable, "-m", "dala_model.report.browser"]
    done = subprocess.run([*command, report], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and SCREENSHOT in done.stdout
    missing = str(tmp_path / "nowhere" / "report.html")
    assert main([missing]) == 2
    assert missing in capsys.readouterr().err
