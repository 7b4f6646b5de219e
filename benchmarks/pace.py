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


def pace_changed(start: float, end: float, factor: float = 1.5) -> str | None:
    """A warning where the pace at a benchmark's end differs from its start by more than ``factor``: a training run
    under a time budget between them got fewer (or more) epochs than the same run on a steady machine, so its
    figures are not comparable with another run's. Only the two ends are measured; a slow spell between them shows
    in the runs' epoch counts, not here."""
    lo, hi = sorted((start, end))
    if lo <= 0 or hi / lo > factor:
        return (f"the machine's pace changed from {start} to {end} GFLOP/s during this run: time-budgeted figures "
                f"are not comparable with another run's (compare the epoch counts)")
    return None
