"""Checkpoints: written atomically, self-describing (config, input spec, data hash, git commit, thresholds),
and refused with a clear message when missing, corrupt or foreign."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

# The content hash a checkpoint records (``dataset.hash``), defined with the dataset format; the training code
# imports it from here.
from vialinspect.datasets.content_hash import dataset_hash  # noqa: F401
from vialinspect.errors import VialinspectError
from vialinspect.vision.pair import Network, network_from_arch
from vialinspect.vision.preprocess import InputSpec

FORMAT = "vialinspect-checkpoint"
VERSION = 1


class CheckpointError(VialinspectError):
    pass


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    payload = {"format": FORMAT, "version": VERSION, "saved_utc": datetime.now(UTC).isoformat(), **payload}
    torch.save(payload, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint under the real name


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: {type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vialinspect checkpoint")
    if ck.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ck.get('version')} not supported (expected {VERSION})")
    for key in ("state_dict", "model", "input_spec"):
        if key not in ck:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return ck


def build_model(ck: dict[str, Any]) -> tuple[Network, InputSpec]:
    net = network_from_arch(ck["model"])
    try:
        net.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the network: {str(e).splitlines()[0]}") from None
    net.eval()
    return net, InputSpec.from_json(ck["input_spec"])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"
