"""A real browser for the tests that need one: Debian's Chromium, installed through apt when missing (never a
Playwright browser download), driven by PyPI playwright."""

from __future__ import annotations

import shutil

import pytest

from tests.apt import apt_install

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    """Debian's Chromium, installed through apt when missing (never a Playwright browser download)."""
    exe = shutil.which("chromium")
    if exe:
        return exe
    apt_install("chromium")
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("apt-get installed chromium, but there is no chromium on the PATH")
    return exe
