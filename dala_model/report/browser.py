"""The HTML report opened in a real browser: images load, no script errors, fits a laptop screen.

``check_report(report.html)`` opens the page in headless Chromium (through Playwright, the
``dev`` extra) at a laptop viewport (1366 x 768 by default) and records what a reader would
meet: console errors and uncaught page errors, any JavaScript dialog (the report has no script,
so one is an injection), every ``<img>`` that did not decode (``naturalWidth`` 0), any request
that left the page (the report is self-contained by design, so every such request is blocked
and listed), and whether the page is wider than the viewport (a horizontal scroll bar: wide
tables must scroll inside their own container instead). It saves a full-page screenshot
beside the report (``reports/report.png``, written atomically) and returns a ``BrowserCheck``.

``python -m dala_model.report.browser ROOT/reports/report.html`` (``make report-check``) prints
the record and exits 1 when the check failed, 2 when it could not run.

Why a browser and not an HTML parser: a parser can tell that an ``<img>`` tag is there, not that
the browser decodes its data URI, that no markup planted in a run id runs, or how wide the page
lays out; those are what a reader sees. Chromium is found as ``$DALA_CHROMIUM`` or on ``PATH``
(Debian's ``chromium`` package, ``apt-get install chromium``), so no browser download is needed;
Playwright's own download (``playwright install chromium``) works too. Running as root (a
container) turns Chromium's sandbox off, which it cannot start as root; the page is our own
file, and every request off it is refused.

A report on object storage is copied to a temporary folder first (the browser reads files); the
screenshot goes back beside the original.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from dala_model import storage

WIDTH, HEIGHT = 1366, 768  # the commonest laptop screen
OVERFLOW_TOLERANCE_PX = 2
SCREENSHOT = "report.png"
CHROMIUM_ENV = "DALA_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_ALLOWED_SCHEMES = ("file:", "data:", "about:", "blob:")
_INSTALL_HINT = (
    "install Debian's browser (apt-get install chromium) or set "
    f"{CHROMIUM_ENV}=/path/to/chrome, and the dev extra (pip install -e '.[dev]') for playwright"
)

# Every image once it has loaded or failed; the src is cut short (data URIs are long).
_IMAGES_JS = """async () => {
  const images = Array.from(document.images);
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done); img.addEventListener('error', done);
  })));
  return images.map(img => ({
    label: img.alt || (img.getAttribute('src') || '').slice(0, 80),
    ok: img.complete && img.naturalWidth > 0,
  }));
}"""
# The page's width against the viewport's, and the outermost elements that stick out.
_OVERFLOW_JS = """(tolerance) => {
  const root = document.documentElement, limit = root.clientWidth + tolerance;
  const out = Array.from(document.body.querySelectorAll('*')).filter(
    el => el.getBoundingClientRect().right > limit);
  const outer = out.filter(el => !out.includes(el.parentElement));
  return {
    client: root.clientWidth,
    scroll: root.scrollWidth,
    offenders: outer.slice(0, 5).map(el =>
      `<${el.tagName.toLowerCase()}> ${Math.round(el.getBoundingClientRect().width)} px: ` +
      (el.textContent || '').trim().slice(0, 60)),
  };
}"""


class BrowserUnavailable(RuntimeError):
    """Playwright or a Chromium to drive is missing, or the browser would not start."""


@dataclass(frozen=True)
class BrowserCheck:
    """What headless Chromium saw on the report page; ``ok`` when it saw no problem."""

    report: str
    width: int
    height: int
    images: int
    scroll_width: int
    client_width: int
    screenshot: str | None
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)
    overflowing: list[str] = field(default_factory=list)

    @property
    def overflows(self) -> bool:
        return self.scroll_width > self.client_width + OVERFLOW_TOLERANCE_PX

    @property
    def problems(self) -> list[str]:
        found = [f"image did not load: {name}" for name in self.broken_images]
        found += [f"console error: {text}" for text in self.console_errors]
        found += [f"page error: {text}" for text in self.page_errors]
        found += [f"dialog opened (script ran): {text}" for text in self.dialogs]
        found += [f"request off the page blocked: {url}" for url in self.blocked_requests]
        if self.overflows:
            found.append(
                f"page is {self.scroll_width} px wide in a {self.client_width} px viewport "
                "(horizontal scroll): " + ("; ".join(self.overflowing) or "no single element")
            )
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"{storage.redact(self.report)} at {self.width}x{self.height}: "
            f"{self.images} images, page {self.scroll_width} px wide in {self.client_width} px, "
            + ("OK" if self.ok else f"{len(self.problems)} problem(s)"),
            *(f"  - {problem}" for problem in self.problems),
        ]
        if self.screenshot:
            lines.append(f"screenshot: {storage.redact(self.screenshot)}")
        return "\n".join(lines)


def find_chromium() -> str:
    """The Chromium to drive: ``$DALA_CHROMIUM``, else the first of ``CHROMIUM_NAMES`` on PATH."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        if not Path(named).is_file():
            raise BrowserUnavailable(f"{CHROMIUM_ENV}={named} is not a file: {_INSTALL_HINT}")
        return named
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserUnavailable(
        f"no Chromium found (looked for ${CHROMIUM_ENV}, then {', '.join(CHROMIUM_NAMES)} on "
        f"PATH): {_INSTALL_HINT}"
    )


def _sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserUnavailable(f"playwright is not installed: {_INSTALL_HINT}") from None
    return sync_playwright


def _local_path(url: str) -> str | None:
    fs, path = storage.filesystem(url)
    return path if isinstance(fs, LocalFileSystem) else None


def _copy_folder(report: str, into: Path) -> Path:
    """The report's folder (its files, not the last screenshot) copied into ``into``."""
    folder, name = report.rstrip("/").rsplit("/", 1)
    for info in storage.list_file_infos(folder):
        if "/" not in info.relpath and info.relpath != SCREENSHOT:
            (into / info.relpath).write_bytes(storage.read_bytes(info.url))
    return into / name


def check_report(
    report: str,
    screenshot_to: str | None = None,
    width: int = WIDTH,
    height: int = HEIGHT,
    timeout_s: float = 60.0,
) -> BrowserCheck:
    """Open ``report`` (a report.html path or URL) in headless Chromium and record what it saw.

    The full-page screenshot goes to ``screenshot_to``, by default ``report.png`` beside the
    report. Raises ``FileNotFoundError`` for a missing report and ``BrowserUnavailable`` when
    Playwright or Chromium is missing."""
    if not storage.exists(report):
        raise FileNotFoundError(
            f"{storage.redact(report)} does not exist: build it with `dala report ROOT` first"
        )
    sync_playwright = _sync_playwright()
    executable = find_chromium()
    screenshot_to = screenshot_to or storage.join(posixpath.dirname(report.rstrip("/")), SCREENSHOT)
    with tempfile.TemporaryDirectory(prefix="dala-report-") as tmp:
        local = _local_path(report)
        page_file = Path(local) if local is not None else _copy_folder(report, Path(tmp))
        seen, png = _open(
            sync_playwright, executable, page_file.resolve(), width, height, timeout_s
        )
    storage.write_bytes_atomic(screenshot_to, png)
    return BrowserCheck(report=report, width=width, height=height, screenshot=screenshot_to, **seen)


def _open(sync_playwright, executable: str, page_file: Path, width, height, timeout_s):
    console: list[str] = []
    errors: list[str] = []
    dialogs: list[str] = []
    blocked: list[str] = []

    def on_dialog(dialog) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_route(route) -> None:
        if route.request.url.startswith(_ALLOWED_SCHEMES):
            route.continue_()
        else:
            blocked.append(route.request.url[:200])
            route.abort()

    args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=executable, headless=True, args=args, timeout=timeout_s * 1000
            )
        except Exception as exc:  # playwright's Error: the browser did not start
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BrowserUnavailable(f"{executable} did not start: {first}") from None
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", on_dialog)
            page.route("**/*", on_route)
            page.goto(page_file.as_uri(), wait_until="load")
            images = page.evaluate(_IMAGES_JS)
            layout = page.evaluate(_OVERFLOW_JS, OVERFLOW_TOLERANCE_PX)
            png = page.screenshot(full_page=True, type="png")
        finally:
            browser.close()
    seen = {
        "images": len(images),
        "broken_images": [image["label"] for image in images if not image["ok"]],
        "scroll_width": int(layout["scroll"]),
        "client_width": int(layout["client"]),
        "overflowing": list(layout["offenders"]),
        "console_errors": console,
        "page_errors": errors,
        "dialogs": dialogs,
        "blocked_requests": blocked,
    }
    return seen, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dala_model.report.browser",
        description="Open a report.html in headless Chromium: images load, no console errors, "
        "no horizontal overflow at a laptop width; saves a full-page screenshot beside it.",
    )
    parser.add_argument("report", help="path or URL of report.html (e.g. ROOT/reports/report.html)")
    parser.add_argument(
        "--screenshot", help=f"where to save the PNG (default: {SCREENSHOT} beside it)"
    )
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per browser step")
    args = parser.parse_args(argv)
    try:
        check = check_report(args.report, args.screenshot, args.width, args.height, args.timeout)
    except (BrowserUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"report check could not run: {storage.redact(exc)}", file=sys.stderr)
        return 2
    print(check.summary())
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
