"""A real browser for the tests that need one: Debian's Chromium, installed through apt when missing (never a
Playwright browser download), driven by PyPI playwright."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    """Debian's Chromium, installed through apt when missing (never a Playwright browser download)."""
    exe = shutil.which("chromium")
    if exe:
        return exe
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("Debian's chromium is not installed and apt-get is not available to install it")
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if shutil.which("sudo") is None:
            pytest.skip("Debian's chromium is not installed; installing it needs root (not root, no sudo)")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "-q", "chromium"]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:  # a fresh image has empty package lists
        subprocess.run([*prefix, apt, "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip(f"apt-get could not install chromium (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    return exe
