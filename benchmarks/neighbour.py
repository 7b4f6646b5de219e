"""A noisy neighbour, for a slow day made on purpose: float32 matrix products on ``--threads`` threads, busy for
``--duty`` of every ``--period-s``, until killed.

    .venv/bin/python benchmarks/neighbour.py [--threads 2] [--duty 1.0] [--period-s 0.1]

These machines' pace varies from day to day (the float32 matrix-product ceiling of benchmarks/runtime.py moved
between 106 and 193 GFLOP/s on 2 cores over a week); a benchmark that must hold on a slow day cannot wait for one.
A second process that takes a share of the cores makes it: on 2 cores, two threads without pause took the ceiling
from ~180 to ~89 GFLOP/s, one thread to ~125; a duty below 1 sets the ceiling in between. ``benchmarks/station.py
--neighbour THREADS:DUTY`` runs it for the whole benchmark and records the ceiling it leaves.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def parse_spec(spec: str) -> tuple[int, float]:
    """``"THREADS"`` or ``"THREADS:DUTY"`` -> (threads >= 1, duty in (0, 1]); ValueError with the reason."""
    head, _, tail = spec.partition(":")
    try:
        threads, duty = int(head), float(tail) if tail else 1.0
    except ValueError:
        raise ValueError(f"neighbour {spec!r}: expected THREADS or THREADS:DUTY, e.g. 2 or 2:0.6") from None
    if threads < 1 or not 0.0 < duty <= 1.0:
        raise ValueError(f"neighbour {spec!r}: threads must be >= 1 and duty in (0, 1]")
    return threads, duty


def burn(threads: int, duty: float, period_s: float) -> None:
    import torch

    torch.set_num_threads(threads)
    # Small products (~3 ms each on 2 cores) so that the busy share of a period is kept to within a few percent.
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    while True:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duty * period_s:
            a @ b
        rest = period_s - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)


class Neighbour:
    """Runs this script as a separate process for the duration of a ``with`` block."""

    def __init__(self, threads: int, duty: float = 1.0, period_s: float = 0.1):
        self.threads, self.duty, self.period_s = threads, duty, period_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Neighbour:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--threads", str(self.threads),
                                      "--duty", str(self.duty), "--period-s", str(self.period_s)])
        time.sleep(2.0)  # torch's import and first products, so that what follows runs beside a busy neighbour
        if self.proc.poll() is not None:
            raise RuntimeError(f"the neighbour process stopped at once (exit {self.proc.returncode})")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def to_json(self) -> dict:
        return {"threads": self.threads, "duty": self.duty, "period_s": self.period_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="threads doing matrix products (default 2)")
    p.add_argument("--duty", type=float, default=1.0, help="busy share of every period, (0, 1] (default 1)")
    p.add_argument("--period-s", type=float, default=0.1, help="length of one busy-and-idle period (default 0.1 s)")
    a = p.parse_args()
    try:
        parse_spec(f"{a.threads}:{a.duty}")
    except ValueError as e:
        p.error(str(e))
    if a.period_s <= 0:
        p.error("--period-s must be > 0")
    burn(a.threads, a.duty, a.period_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
