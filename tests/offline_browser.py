"""What the browser tests share: Debian's chromium driven by Playwright (its own browser download needs
network access these machines lack), and a page opened offline that records console errors, page
errors and every request beyond the file itself and data: URIs (the pages must embed everything)."""

from __future__ import annotations

import contextlib
import os
import shutil

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def launch_chromium(sync_api):
    """A headless chromium for the duration of the block (sync_api: playwright.sync_api)."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_offline(browser, path: str):
    """(page, problems) for the local file ``path``, loaded; problems lists every console error, page
    error and network request seen while the block runs."""
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: None if request.url.startswith(("file://", "data:"))
            else problems.append(f"network request to {request.url}"))
    page.goto("file://" + path)
    page.wait_for_load_state("load")
    try:
        yield page, problems
    finally:
        context.close()
