"""The report in a real browser: headless Chromium opens it from file:// with networking off.

Checks that no script error happens (the page records window errors, unhandled rejections and
console.error calls into ``<pre id="js-errors">``; Chromium's console log is scanned too) and
that every plotly figure is drawn. Screenshots are saved next to the reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import shared_root
from test_report import (
    FIGURES,
    MAX_REPORT_BYTES,
    build_synthetic_study,
    build_tiny_study,
    figures_in,
)

from transferstudy import report
from transferstudy.report import html
from transferstudy.report.page import asset

ERRORS_JS, SORT_JS = asset("errors.js"), asset("sort.js")

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.is_file() and not os.environ.get("TRANSFERSTUDY_REQUIRE_SERVICES"),  # CI: a missing browser fails
        reason="headless Chromium not installed at /usr/bin/chromium (apt-get install chromium)",
    ),
]


def chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local page with every network request failing."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                "--proxy-server=http://127.0.0.1:9",
                *args,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def page_errors(stderr: str) -> list[str]:
    """Console lines of Chromium's log that report a script error."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line and re.search(r"Uncaught|Error", line)]


def check_in_browser(path: Path, screenshot: bool = True) -> None:
    """No script error, every figure drawn by plotly in the DOM, and (``screenshot``) a painted page."""
    page = path.read_text()
    dumped = chromium(path, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    errors = re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert errors is not None, "the DOM dump is incomplete"
    assert errors.group(1).strip() == "", f"script errors: {errors.group(1)[:2000]}"
    assert page_errors(dumped.stderr) == []
    expected = figures_in(page)
    assert dom.count('class="plot-container plotly"') == len(expected) == len(FIGURES)
    if not screenshot:
        return
    shot = path.with_suffix(".png")
    taken = chromium(path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1400,4000")
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]


def test_tiny_study_report_renders_in_chromium(tmp_path_factory):
    url, name = build_tiny_study(shared_root(tmp_path_factory, "report-tiny"))
    path = report.build_report(url, name, out=tmp_path_factory.getbasetemp() / "browser" / "tiny.html")
    check_in_browser(path)


def test_196_class_report_renders_in_chromium(tmp_path_factory):
    url, name = build_synthetic_study(shared_root(tmp_path_factory, "report-cars196"))
    path = report.build_report(url, name, out=tmp_path_factory.getbasetemp() / "browser" / "cars196.html")
    assert path.stat().st_size < MAX_REPORT_BYTES
    check_in_browser(path, screenshot=False)  # the tiny report's screenshot shows painting works


def test_error_hook_catches_script_errors(tmp_path):
    """The check above would see a broken page: an error thrown after load lands in the DOM."""
    page = tmp_path / "broken.html"
    page.write_text(
        f'<html><body><pre id="js-errors" hidden></pre><script>{ERRORS_JS}</script>'
        "<script>console.error('plot failed'); notAFunction();</script></body></html>"
    )
    dom = chromium(page, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert "plot failed" in dom.stdout and "notAFunction" in dom.stdout
    assert page_errors(dom.stderr)


def test_tables_sort_when_a_header_is_clicked(tmp_path):
    rows = [
        [html.cell(name), html.cell(value, f"{value:.1%}")] for name, value in (("b", 0.5), ("a", 0.05), ("c", 0.25))
    ]
    page = tmp_path / "sort.html"
    page.write_text(
        f"<html><body>{html.table(['class', 'share'], rows)}<script>{SORT_JS}</script>"
        "<script>document.querySelectorAll('th')[1].click();</script></body></html>"
    )
    dom = chromium(page, "--dump-dom").stdout
    assert re.findall(r"<td>([abc])</td>", dom) == ["b", "c", "a"]  # first click: largest first
