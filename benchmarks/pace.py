"""The machine's pace, measured in the same run as a benchmark's times (these machines vary by up to 40% from day
to day, so a time means little without the pace it was measured at)."""

from __future__ import annotations

import time


def pace_gflops() -> float:
    """Float32 matrix products per second on all cores (GFLOP/s), over one second."""
    import torch

    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0) / 1e9
