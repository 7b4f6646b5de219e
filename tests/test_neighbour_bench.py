"""benchmarks/neighbour.py, the slow day made on purpose: its THREADS[:DUTY] spec."""

from __future__ import annotations

import pytest

from .benchmark_module import benchmark


def test_the_slow_day_neighbour_takes_threads_and_a_duty_and_refuses_nonsense():
    with benchmark("neighbour") as nb:
        assert nb.parse_spec("2") == (2, 1.0) and nb.parse_spec("2:0.7") == (2, 0.7)
        for bad in ("0", "2:0", "2:1.5", "two", "2:x", ""):
            with pytest.raises(ValueError, match="neighbour"):
                nb.parse_spec(bad)
