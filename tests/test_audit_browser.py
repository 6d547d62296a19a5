"""The model audit's HTML in a real headless browser (Debian's chromium driven by Playwright), as
test_report_browser.py does for the report: the audit page and a report embedding the audit section
load offline without console errors or network requests, and show every table and chart. Skipped only
when chromium or the playwright package is absent."""

from __future__ import annotations

import pytest
from offline_browser import CHROMIUM, launch_chromium, open_offline
from test_audit import NAMES, seeing_only

from torchreid_attrimeter.audit import AuditRun, compare_audits
from torchreid_attrimeter.audit_output import audit_section_html, write_audit
from torchreid_attrimeter.report import build_report_html

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium executable (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The audit's index.html of two hand-built interpreters and their comparison, and a report page
    (no queries) with the audit section embedded."""
    upred, hat = seeing_only(NAMES.index("upred")), seeing_only(NAMES.index("hat"), name="hat-only")
    run = AuditRun([upred, hat], {"name": "hand-built", "queries": 60, "gallery": 240},
                   compare_audits([upred, hat], resamples=50))
    folder = tmp_path_factory.mktemp("audit_browser")
    files = write_audit(run, folder / "audit", dpi=40)
    embedded = folder / "report.html"
    figures = {path.stem: path.read_bytes() for path in (folder / "audit").glob("*.png")}  # drawn once
    embedded.write_text(build_report_html([], title="report with an audit",
                                          sections=[audit_section_html(run, figures)]))
    return {"audit": files.html, "report": str(embedded)}


@pytest.fixture(scope="module")
def browser():
    with launch_chromium(sync_api) as browser:
        yield browser


@pytest.mark.parametrize("which", ["audit", "report"])
def test_the_audit_section_loads_offline_with_every_table_and_chart(browser, pages, which):
    with open_offline(browser, pages[which]) as (page, problems):
        assert problems == []
        section = page.locator("#model-audit")
        assert section.is_visible()
        assert page.locator("#model-audit table.reliance").count() == 2
        assert page.locator("#model-audit table.reliance tr[data-attribute]").count() == 2 * len(NAMES)
        assert page.locator("#model-audit table.comparison tbody tr").count() == len(NAMES)
        assert "hat" in page.locator("#model-audit ul.blind-spots").first.inner_text()
        # The section's own style came with it: group rows are shaded in both pages.
        shade = page.locator("#model-audit tr.group td").first.evaluate("cell => getComputedStyle(cell).backgroundColor")
        assert shade == "rgb(238, 238, 255)"
        images = page.locator("#model-audit img")
        assert images.count() == 4  # two reliance charts, sensitivity, comparison
        widths = images.evaluate_all("images => images.map(image => image.complete ? image.naturalWidth : 0)")
        assert all(width > 0 for width in widths)
