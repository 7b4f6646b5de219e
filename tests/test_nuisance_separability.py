"""What benchmarks/nuisance_separability.py's table is made of: AUROC and the share of particles above the droplets."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from .benchmark_module import benchmark


def test_auroc_is_the_pairwise_win_rate_and_the_table_counts_particles_above_the_droplets():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1.0, 1.0, 40), np.r_[rng.normal(0.0, 1.0, 300), 0.5, 0.5]
    pos[:3] = 0.5  # ties count half
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    with benchmark("nuisance_separability") as m:
        assert m.summary("x", neg, pos, np.full(len(pos), 60.0))["auroc"] == pytest.approx(brute)
        droplets = np.arange(100, dtype=float)  # the 98th percentile is 97.02
        particles = np.array([99.0, 98.0, 97.0, 150.0])
        sizes = np.array([60.0, 80.0, 120.0, 400.0])
        row = m.summary("x", droplets, particles, sizes)
    assert row["above_q98"] == 0.75 and row["above_q98_small"] == pytest.approx(2 / 3)
    assert (row["n_nuisance"], row["n_particles"]) == (100, 4)


def test_a_folder_that_is_not_a_retraining_run_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    with benchmark("nuisance_separability") as m:
        monkeypatch.setattr(sys, "argv", ["nuisance_separability.py", "--work", str(tmp_path)])
        with pytest.raises(SystemExit) as e:
            m.main()
    assert e.value.code == 2 and "not a finished benchmarks/retrain_loop.py work folder" in capsys.readouterr().err
