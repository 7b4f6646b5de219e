"""Drawing the good units the network scores highest more often (training.hard_goods, setting hard_good_top)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import small_config
from vialinspect.training import hard_goods
from vialinspect.training.config import TrainConfig
from vialinspect.training.data import MixedBatchSampler
from vialinspect.training.hard_goods import HardGoodTracker, hard_good_weights
from vialinspect.training.trainer import train


def test_the_highest_scored_good_units_get_the_factor_and_the_classes_keep_their_shares():
    base = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.25, 0.25])  # five good units, two defects
    good = np.array([True] * 5 + [False] * 2)
    scores = np.array([0.2, 0.9, np.nan, 0.7, 0.1, 0.99, 0.99])  # one good unit not yet seen
    w = hard_good_weights(base, good, scores, top=0.4, factor=3.0)  # 2 of 5 good units are "hard"
    assert w.sum() == pytest.approx(1.0)
    assert w[good].sum() == pytest.approx(0.5) and w[~good] == pytest.approx([0.25, 0.25])
    assert w[1] == pytest.approx(w[3]) and w[1] == pytest.approx(3 * w[0])  # units 1 and 3 scored highest
    assert w[0] == pytest.approx(w[2]) == pytest.approx(w[4])  # the unseen unit is an ordinary one
    # Off, nothing seen, or a factor of 1: the weights as they were.
    for kw in ({"top": 0.0, "factor": 3.0}, {"top": 0.4, "factor": 1.0}):
        assert hard_good_weights(base, good, scores, **kw) == pytest.approx(base)
    assert hard_good_weights(base, good, np.full(7, np.nan), 0.4, 3.0) == pytest.approx(base)


def test_ties_are_broken_by_position_so_every_rank_draws_alike():
    base, good = np.full(4, 0.25), np.ones(4, bool)
    w = hard_good_weights(base, good, np.array([0.5, 0.5, 0.5, 0.5]), top=0.5, factor=2.0)
    assert w[:2] == pytest.approx([1 / 3, 1 / 3]) and w[2:] == pytest.approx([1 / 6, 1 / 6])


def test_the_tracker_keeps_whole_good_units_only_and_remembers_the_units_not_drawn_again():
    tr = HardGoodTracker(4, np.array([True, True, True, False]))
    logits = torch.tensor([[2.0, -1.0, -3.0], [-2.0, 0.0, -5.0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([[0.0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])  # unit 2 drawn with a synthetic particle
    full = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last row is a crop
    tr.observe(torch.tensor([0, 1, 2, 1]), full, labels, logits)
    tr.end_epoch(world=1)
    assert tr.scores[0] == pytest.approx(1 / (1 + np.exp(-2.0)))  # the highest class probability
    assert tr.scores[1] == pytest.approx(0.5)  # not the crop's 0.99
    assert np.isnan(tr.scores[2]) and np.isnan(tr.scores[3])
    tr.observe(torch.tensor([1]), torch.tensor([1.0]), torch.zeros(1, 3), torch.full((1, 3), -4.0))
    tr.end_epoch(world=1)
    assert tr.scores[0] == pytest.approx(1 / (1 + np.exp(-2.0)))  # kept from the epoch before
    assert tr.scores[1] == pytest.approx(1 / (1 + np.exp(4.0)))  # the latest draw, not the highest
    w = tr.weights(np.full(4, 0.25), top=0.34, factor=4.0)  # 1 of 3 good units
    assert w[0] == pytest.approx(4 * w[1]) and w[3] == pytest.approx(0.25)


def test_the_sampler_draws_the_hard_units_more_often():
    n = 40
    good = np.ones(n, bool)
    w = hard_good_weights(np.full(n, 1 / n), good, np.linspace(0, 1, n), top=0.1, factor=5.0)
    sampler = MixedBatchSampler([(8, 8)] * n, [False] * n, 4, 4000, w, seed=0)
    drawn = np.bincount([i for b in sampler for i, _, _ in b], minlength=n)
    assert drawn[-4:].mean() > 3.5 * drawn[:-4].mean()


@pytest.mark.parametrize("bad", [{"hard_good_top": 1.5}, {"hard_good_top": -0.1}, {"hard_good_weight": 0.5}])
def test_bad_hard_good_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig.from_dict(bad)


def test_training_reweighs_its_good_units_after_each_epoch(coarse_data, tmp_path, monkeypatch):
    calls = []
    real = hard_goods.hard_good_weights

    def spy(base, good, scores, top, factor):
        out = real(base, good, scores, top, factor)
        calls.append((np.asarray(base).copy(), good.copy(), scores.copy(), out))
        return out

    monkeypatch.setattr(hard_goods, "hard_good_weights", spy)
    lines = []
    train(coarse_data, tmp_path / "run", small_config(epochs=2, hard_good_top=0.25, hard_good_weight=4.0),
          progress=False, log=lines.append)
    assert any("scored highest when last drawn are drawn 4 times as often" in x for x in lines)
    assert len(calls) == 2  # once after each epoch
    base, good, scores, out = calls[-1]
    assert np.isfinite(scores[good]).sum() >= 2 and not np.isfinite(scores[~good]).any()
    hard = out / base
    assert hard[good].max() == pytest.approx(4 * hard[good].min())
    assert out[good].sum() == pytest.approx(base[good].sum())  # the good units' share as class_draw says


def _merge_worker(rank, port, results):
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tr = HardGoodTracker(4, np.ones(4, bool))
    # Each rank draws other units; unit 3 on both, where rank 1 scored it higher.
    units = [0, 3] if rank == 0 else [1, 3]
    logits = torch.tensor([[0.0, -9.0, -9.0], [-2.0 + 3.0 * rank, -9.0, -9.0]])
    tr.observe(torch.tensor(units), torch.ones(2), torch.zeros(2, 3), logits)
    tr.end_epoch(world=2)
    results[rank] = [None if np.isnan(v) else round(float(v), 6) for v in tr.scores]
    dist.destroy_process_group()


def test_every_ddp_rank_ends_the_epoch_with_the_same_scores():
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_merge_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    sig = lambda x: round(float(1 / (1 + np.exp(-x))), 6)  # noqa: E731
    assert results[0] == results[1] == [sig(0.0), sig(0.0), None, sig(1.0)]
