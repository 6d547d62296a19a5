"""The HTML report in a real headless browser (Debian's chromium driven by Playwright): it loads
offline without console errors or network requests, shows the expected numbers of queries and
pairs, and opens each pair's maps. Skipped only when chromium or the playwright package is absent
(CI installs both: apt-get install -y chromium; pip install -e .[test])."""

from __future__ import annotations

import json
import os

import pytest
from explain_fixtures import tiny_setup
from offline_browser import CHROMIUM, launch_chromium, open_offline

from torchreid_attrimeter.attributes import get_schema
from torchreid_attrimeter.explain import Explainer
from torchreid_attrimeter.report import ImageRecord, prepare_output_dir, write_report

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium executable (Debian: apt-get install -y chromium)")

TOPK = 3
SCHEMA = get_schema("market1501")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of three queries: two explained, one whose image file is missing; every image carries
    its ground-truth attributes, so the report marks the attributes whose labels differ."""
    setup = tiny_setup(tmp_path_factory)
    explainer = Explainer.from_checkpoint(setup.checkpoint, device="cpu")
    loaders = setup.engine.datamanager.test_loader["synthetic_attr"]
    query = [ImageRecord(*item[:3], loaders["query"].dataset.labels_of(item[0]))
             for item in loaders["query"].dataset.data]
    gallery = [ImageRecord(*item[:3], loaders["gallery"].dataset.labels_of(item[0]))
               for item in loaders["gallery"].dataset.data]
    queries = [query[0], ImageRecord(os.path.join(setup.folder, "missing_query.jpg"), 1, 0), query[2]]
    folder = prepare_output_dir(tmp_path_factory.mktemp("browser") / "report")
    files = write_report(explainer, queries, gallery, folder, topk=TOPK, info={"dataset": "synthetic_attr"})
    return files


@pytest.fixture(scope="module")
def browser():
    with launch_chromium(sync_api) as browser:
        yield browser


@pytest.fixture
def page(browser, report):
    with open_offline(browser, report.index) as opened:
        yield opened


def test_report_loads_offline_without_console_errors(page):
    page, problems = page
    assert page.title() == "AttriMeter explanations"
    assert problems == []


def test_report_shows_every_query_and_its_ranked_pairs(page):
    page, _ = page
    assert page.locator("section.query").count() == 3
    assert page.locator("section.query.failed").count() == 1
    assert page.locator(".item.pair").count() == 2 * TOPK
    assert page.locator("section.query").nth(1).locator(".error").inner_text().count("missing_query.jpg") == 1
    assert page.locator(".item.pair").first.locator(".bars .bar").count() == 5
    all_images_loaded = page.evaluate(
        "Array.from(document.querySelectorAll('img.thumb')).every(img => img.complete && img.naturalWidth > 0)")
    assert all_images_loaded


def test_each_pairs_maps_open_in_the_viewer_and_close(page):
    page, problems = page
    viewer = page.locator("#viewer")
    buttons = page.locator("button.open-maps")
    assert buttons.count() == 2 * TOPK
    for index in range(buttons.count()):
        buttons.nth(index).click()
        assert viewer.is_visible()
        assert page.evaluate("document.getElementById('viewer-image').naturalWidth") > 0
        assert f"rank {index % TOPK + 1}" in page.locator("#viewer-caption").inner_text()
        page.keyboard.press("Escape")
        assert not viewer.is_visible()
    assert problems == []


def test_all_attribute_bars_fold_out(page):
    page, _ = page
    details = page.locator(".item.pair").first.locator("details")
    assert not details.locator(".bar").first.is_visible()
    details.locator("summary").click()
    assert details.locator(".bar").count() == 26 and details.locator(".bar").first.is_visible()


def test_attributes_whose_labels_differ_are_marked_and_shares_shown_against_the_even_share(page, report):
    page, _ = page
    with open(report.jsons[0], encoding="utf-8") as handle:
        first = json.load(handle)["ranked"][0]
    differing = [entry["name"] for entry in first["attributes"] if entry["labelled_difference"]]
    assert differing, "the first pair's images should differ in some labelled attribute"
    item = page.locator(".item.pair").first
    item.locator("summary").click()
    marked = item.locator("details .bar.labelled-differs")
    assert marked.locator(".name").all_inner_texts() == [
        name for group in SCHEMA.groups.values() for name in group if name in differing]
    for index in range(marked.count()):
        bar = marked.nth(index)
        assert "\u2260" in bar.locator(".marks").inner_text() and bar.locator(".marks").is_visible()
        assert int(bar.locator(".label").evaluate("node => getComputedStyle(node).fontWeight")) >= 700
        assert bar.locator(".fill").evaluate("node => getComputedStyle(node).borderTopStyle") == "solid"
    unmarked = item.locator("details .bar:not(.labelled-differs) .label")
    assert not any("\u2260" in text for text in unmarked.all_inner_texts())
    assert item.locator(".labelled-summary").inner_text().startswith("labels differ: ")

    # The dotted even-share tick sits at 1/M of the largest share along each visible track.
    shares = [entry["share"] for entry in first["attributes"]]
    track = item.locator("details .bar .track").first
    tick = item.locator("details .bar .even").first
    assert tick.is_visible()
    track_box, tick_box = track.bounding_box(), tick.bounding_box()
    expected = (1 / len(shares)) / max(shares) * track_box["width"]
    assert abs(tick_box["x"] - track_box["x"] - expected) <= 0.02 * track_box["width"] + 2
    above = item.locator("details .bar.above-even .fill").first
    below = item.locator("details .bar:not(.above-even):not(.labelled-differs) .fill").first
    assert float(above.evaluate("node => getComputedStyle(node).opacity")) == 1.0
    assert float(below.evaluate("node => getComputedStyle(node).opacity")) < 1.0
    ratio = item.locator(".bars .bar .ratio").first.inner_text()
    assert ratio == f"{max(shares) * len(shares):.1f}\u00d7"
