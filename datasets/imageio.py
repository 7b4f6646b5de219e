"""Reading inspection images of any common kind: PNG, JPEG, BMP, TIFF; 8 or 16 bit; gray or colour.

Every image comes back as 2-D grayscale. A missing, empty, truncated or undecodable file raises
``ImageError`` naming the file and the reason, never a bare OpenCV failure.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageError(Exception):
    pass


def _looks_truncated(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        # A complete PNG ends with the IEND chunk (and its CRC).
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            return "truncated PNG (no IEND chunk)"
    elif data.startswith(b"\xff\xd8"):
        if data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) < 0:
            return "truncated JPEG (no end-of-image marker)"
    return None


def read_gray(path: str | Path) -> np.ndarray:
    """Load an image as a 2-D array, keeping its bit depth (uint8 or uint16)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from None
    if not data:
        raise ImageError(f"{path}: empty file")
    why = _looks_truncated(data)
    if why:
        raise ImageError(f"{path}: {why}")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.shape[2] == 3 else img[:, :, 0]
    if img.dtype not in (np.uint8, np.uint16):
        if img.dtype in (np.float32, np.float64):
            img = np.clip(img, 0, 1) * 65535
        img = img.astype(np.uint16)
    return img


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """uint8/uint16 image to float32 in [0, 1]."""
    scale = 1.0 / 65535.0 if img.dtype == np.uint16 else 1.0 / 255.0
    return img.astype(np.float32) * scale


def to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    return np.clip(np.asarray(img, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)


_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Lossless PNG, tuned for noisy camera frames.

    Huffman-only deflate with the 'up' row filter encodes ~2.4x faster than zlib level 1 with adaptive
    filters, for files ~4% larger (measured on 650x1175 simulator frames).
    """
    ok, buf = cv2.imencode(".png", img, _PNG_PARAMS)
    if not ok:
        raise ImageError(f"{path}: PNG encoding failed")
    Path(path).write_bytes(buf.tobytes())
