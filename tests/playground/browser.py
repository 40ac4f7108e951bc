"""A real browser for the playground tests: Playwright for Python driving Debian's
`chromium` package (.ci/run installs it; Playwright's own browser download is not
reachable here). Skips with the reason when either is missing, and fails under CI."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("K2SERVE_TEST_CHROMIUM", "/usr/bin/chromium")
# No network beyond the page's own origin, no GPU, no first-run work: quiet and bounded.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--mute-audio", "--autoplay-policy=no-user-gesture-required",
        # a microphone that plays a beep, granted without asking: the recording path runs
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def _missing(message: str):
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def launch(playwright):
    """Chromium from the system package, headless."""
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        _missing(f"no chromium at {CHROMIUM}: `apt-get install -y chromium` (as .ci/run does), "
                 f"or set K2SERVE_TEST_CHROMIUM")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        _missing("playwright is not installed: `pip install -e '.[test]'`")
    return start()
