"""Training losses for VialNet's three heads; each is used only where the data has the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vialinspect.vision.model import ROW_STRIDE, soft_rows
from vialinspect.vision.scores import CLASSES, LOCALIZED


def row_loss(row_logits: torch.Tensor, rows_px: torch.Tensor, has_fill: torch.Tensor) -> torch.Tensor:
    """Cross-entropy towards a soft (Gaussian, 1 cell) target around each true row, plus L1 of the
    soft-argmax row and of the surface-to-bottom distance (what the fill height is made of)."""
    if has_fill.sum() == 0:
        return row_logits.sum() * 0.0
    sel = has_fill > 0
    logits, rows = row_logits[sel], rows_px[sel]
    n_rows = logits.shape[-1]
    centres = (torch.arange(n_rows, device=logits.device, dtype=logits.dtype) * ROW_STRIDE
               + (ROW_STRIDE - 1) / 2.0)
    d = (centres[None, None, :] - rows[:, :, None]) / ROW_STRIDE
    target = torch.softmax(-0.5 * d * d, dim=-1)
    ce = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    # L1 terms refine to sub-cell precision once the cross-entropy has found the right place; clamped so that
    # early, far-off guesses do not swamp the other heads' gradients.
    pred = soft_rows(logits)
    l1 = ((pred - rows).abs() / ROW_STRIDE).clamp(max=4.0).mean()
    dist = (((pred[:, 1] - pred[:, 0]) - (rows[:, 1] - rows[:, 0])).abs() / ROW_STRIDE).clamp(max=4.0).mean()
    return ce + 0.5 * (l1 + dist)


def map_loss(maps: torch.Tensor, target: torch.Tensor, pos_weight: float, balanced: bool = False,
             nuisance: torch.Tensor | None = None, nuisance_weight: float = 1.0,
             ignore: torch.Tensor | None = None, hard_negatives: int = 0,
             hard_negative_weight: float = 1.0) -> torch.Tensor:
    """Per-cell BCE; defect cells weigh ``pos_weight`` times a background cell, since they are rare.

    ``nuisance`` (B, 1, h, w), 1 in the cells of nuisance objects (bubbles, droplets, glass marks): there a
    class's background cells weigh ``nuisance_weight`` times, as hard negatives. The idea: a droplet is a few
    cells among thousands, too few as ordinary background to teach the crack map a ring on the glass from a
    crack (droplets drew crack scores up to 0.97 on good units). Measured at 10, it did not help
    (docs/model_history.md).

    ``ignore`` (B, 3, h, w), 1 in the background cells of defects training leaves out (short cracks): they
    weigh nothing.

    ``balanced`` (``pos_weight`` then unused): per class, the mean over defect cells and the
    (weighted) mean over background cells count alike. A 3-pixel particle is a handful of cells among ~8,000
    in a whole container; averaged over all cells, even 10-fold weighted, its gradient all but vanishes.

    ``hard_negatives``: each item's ``hard_negatives`` worst background cells per class count again, as their
    own mean (in the weighted loss, one mean over items and classes). Where no mask marks the nuisance objects
    (a line's own good images, a reviewed false reject), the bubble, dust speck, printed dot or oil droplet
    that looks most like a particle is one cell among thousands in the background mean; this term is what
    teaches the map that it is not one. ``hard_negative_weight`` scales the term."""
    pos = (target > 0.5).to(maps.dtype)
    neg = 1.0 - pos
    w_neg = neg
    if nuisance is not None and nuisance_weight != 1.0:
        w_neg = w_neg * (1.0 + (nuisance_weight - 1.0) * nuisance.to(maps.dtype))
    if ignore is not None:
        w_neg = w_neg * (1.0 - ignore.to(maps.dtype))
    if not balanced:
        pw = torch.tensor(pos_weight, device=maps.device, dtype=maps.dtype)
        # pos_weight scales the defect term; the cell weight is 1 on defect cells, so it does not add to it.
        loss = F.binary_cross_entropy_with_logits(maps, target, weight=None if w_neg is neg else w_neg + pos,
                                                  pos_weight=pw)
        if hard_negatives > 0:
            per_cell = F.binary_cross_entropy_with_logits(maps, target, reduction="none")
            loss = loss + hard_negative_weight * _worst_background(per_cell, w_neg, hard_negatives).mean()
        return loss
    per_cell = F.binary_cross_entropy_with_logits(maps, target, reduction="none")
    dims = (0, 2, 3)
    l_neg = (per_cell * w_neg).sum(dims) / w_neg.sum(dims).clamp(min=1.0)
    if hard_negatives > 0:
        l_neg = l_neg + hard_negative_weight * _worst_background(per_cell, w_neg, hard_negatives).mean((0, 2))
    n_pos = pos.sum(dims)
    l_pos = (per_cell * pos).sum(dims) / n_pos.clamp(min=1.0)
    return (l_neg + (n_pos > 0).to(maps.dtype) * l_pos).mean()


def _worst_background(per_cell: torch.Tensor, w_neg: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, k): each item's ``k`` highest weighted background losses per class (the hard negatives)."""
    flat = (per_cell * w_neg).flatten(2)
    return flat.topk(min(k, flat.shape[-1]), dim=-1).values


def distill_loss(maps: torch.Tensor, teacher_maps: torch.Tensor, pos_weight: float = 10.0) -> torch.Tensor:
    """BCE of the student's map logits towards the teacher's map probabilities (the same items in both).

    A cell counts ``1 + pos_weight * p_teacher`` times: the few cells where the teacher sees something (a
    small particle it finds) are what fine-tuning is most likely to lose among thousands of background cells.
    """
    s, t = maps, teacher_maps.detach()
    p = torch.sigmoid(t)
    w = 1.0 + pos_weight * p
    per_cell = F.binary_cross_entropy_with_logits(s, p, reduction="none")
    # The teacher's own entropy is the floor of that BCE; subtracted, a student equal to its teacher scores 0.
    floor = F.binary_cross_entropy_with_logits(t, p, reduction="none")
    return ((per_cell - floor) * w).sum() / w.sum()


MIL_POOLS = ("max", "soft")
SOFT_MIL_CELLS = 16  # the map cells a labelled defect's push is shared among under mil_pool "soft"


def soft_peak(maps: torch.Tensor, cells: int = SOFT_MIL_CELLS) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): each map's ``cells`` highest logits averaged with softmax weights (held fixed in the
    gradient), so each of them gets its weight's share of the push: nearly all of it where one cell stands out
    (the value is then the peak, and a confident defect saturates as under max pooling), a real share where
    several are close. Never above the peak."""
    flat = maps.flatten(2)
    top = flat.topk(min(cells, flat.shape[-1]), dim=-1).values
    w = torch.softmax(top.detach(), -1)
    return (w * top).sum(-1)


def image_level_logits(class_logits: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor,
                       has_mask: torch.Tensor) -> torch.Tensor:
    """The class logits the loss sees under mil_pool "soft": for an item without a mask (a line's labelled
    reject), a positive local class (particle, crack: their logit is the map's peak) takes ``soft_peak``
    instead. Where the peak of a labelled particle unit is a bubble, max pooling raises only that bubble, which
    the good units' hard negatives lower again; the soft peak also reaches the next candidates, the faint
    particle among them. Negatives, masked items and the fill level keep the peak (inference always does)."""
    peak = torch.tensor([c in LOCALIZED for c in CLASSES], device=labels.device)  # the fill level is global
    take = (~has_mask)[:, None] & (labels > 0.5) & peak
    if not bool(take.any()):
        return class_logits
    return torch.where(take, soft_peak(maps).to(class_logits.dtype), class_logits)


def total_loss(outputs, batch: dict, weights=(1.0, 1.0, 1.0), pos_weight: float = 10.0, balanced: bool = False,
               nuisance_weight: float = 1.0, hard_negatives: int = 0, hard_negative_weight: float = 1.0,
               mil_pool: str = "max"):
    class_logits, maps, row_logits = outputs
    labels = batch["labels"]
    has_mask = batch["has_mask"] > 0
    if mil_pool == "soft":
        class_logits = image_level_logits(class_logits, maps, labels, has_mask)
    l_cls = F.binary_cross_entropy_with_logits(class_logits, labels, weight=batch.get("label_weight"))
    if has_mask.any():
        nuisance, ignore = batch.get("map_nuisance"), batch.get("map_ignore")
        l_map = map_loss(maps[has_mask], batch["map_target"][has_mask], pos_weight, balanced,
                         None if nuisance is None else nuisance[has_mask], nuisance_weight,
                         None if ignore is None or not bool(ignore.any()) else ignore[has_mask], hard_negatives,
                         hard_negative_weight)
    else:
        l_map = maps.sum() * 0.0
    l_row = row_loss(row_logits, batch["rows"], batch["has_fill"])
    total = weights[0] * l_cls + weights[1] * l_map + weights[2] * l_row
    return total, {"cls": float(l_cls.detach()), "map": float(l_map.detach()), "row": float(l_row.detach())}
