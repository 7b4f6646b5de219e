"""Debian packages that some tests need (Chromium, the PostgreSQL server), installed through apt when missing,
so that `make test` passes on a fresh machine; a test skips with the reason when that cannot be done."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def apt_install(package: str, *options: str) -> None:
    """``apt-get install -y PACKAGE`` (with ``sudo -n`` when not root; ``apt-get update`` once if the package
    lists are empty, as on a fresh image). Skips the calling test when apt is missing or the install fails."""
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"Debian's {package} is not installed and apt-get is not available to install it")
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if shutil.which("sudo") is None:
            pytest.skip(f"Debian's {package} is not installed; installing it needs root (not root, no sudo)")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "-q", *options, package]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:  # a fresh image has empty package lists
        subprocess.run([*prefix, apt, "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"apt-get could not install {package} (exit {r.returncode}): {r.stderr.strip()[-300:]}")
