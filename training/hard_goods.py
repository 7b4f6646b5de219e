"""Drawing the good units the network still scores high more often (setting ``hard_good_top``).

On a line's own images the good units that set the false-reject threshold carry bubbles, dust specks and
scratches; drawn as often as any other good unit (about once an epoch, four times in five with a synthetic
defect drawn in), each is seen whole and clean two or three times in a 20-minute run, and the network still
scores them near the defects on its own training units (docs/new_line.md). This keeps each good training unit's
last defect score, read off the training steps themselves (no extra pass), and gives the highest share of them
more of the good units' draws; the classes' shares stay as ``class_draw`` says. Measured on two lines and not
adopted (default off).
"""

from __future__ import annotations

import numpy as np
import torch


def hard_good_weights(base: np.ndarray, good: np.ndarray, scores: np.ndarray, top: float,
                      factor: float) -> np.ndarray:
    """Sampling weights: ``base`` with the good units among the highest ``top`` share of those scored (``scores``,
    NaN where not yet seen) weighed ``factor`` times, the good units' total kept; normalised to sum 1."""
    w = np.asarray(base, np.float64).copy()
    good = np.asarray(good, bool)
    seen = good & np.isfinite(scores)
    n_hard = int(round(top * int(good.sum())))
    if n_hard <= 0 or not seen.any() or factor == 1.0:
        return w / w.sum()
    idx = np.flatnonzero(seen)
    # Ties broken by position so that every rank (and a rerun) picks the same units.
    order = idx[np.lexsort((idx, -scores[idx]))]
    hard = order[:n_hard]
    total = w[good].sum()
    w[hard] *= factor
    w[good] *= total / w[good].sum()
    return w / w.sum()


class HardGoodTracker:
    """Each good training unit's highest defect probability when last drawn whole and left good (no synthetic
    defect), kept across epochs; merged over DDP ranks at each epoch's end so every rank draws alike."""

    def __init__(self, n: int, good: np.ndarray):
        self.good = np.asarray(good, bool)
        self.scores = np.full(n, np.nan)
        self._epoch = torch.full((n,), -1.0)  # this epoch's scores (probabilities, -1 = not seen)

    def observe(self, index: torch.Tensor, full: torch.Tensor, labels: torch.Tensor,
                class_logits: torch.Tensor) -> None:
        keep = (full > 0) & (labels.sum(1) == 0)
        if not bool(keep.any()):
            return
        p = torch.sigmoid(class_logits.detach().float()[keep]).amax(1).cpu()
        self._epoch[index[keep].long().cpu()] = p

    def end_epoch(self, world: int) -> None:
        if world > 1:
            import torch.distributed as dist

            t = self._epoch.clone()
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self._epoch = t.cpu()
        seen = self._epoch.numpy() >= 0
        self.scores[seen] = self._epoch.numpy()[seen]
        self._epoch.fill_(-1.0)

    def weights(self, base: np.ndarray, top: float, factor: float) -> np.ndarray:
        return hard_good_weights(base, self.good, self.scores, top, factor)


__all__ = ["HardGoodTracker", "hard_good_weights"]
