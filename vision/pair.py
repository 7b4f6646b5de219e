"""A line's sequence network with a still-image network beside it for cracks: one model, one exported graph.

On a line's spin-stop sequences with image-level labels, the sequence network (VialNet on K frames, its motion
branch) finds particles, which need motion to be told from marks on the glass; a network trained on each unit's
first frame alone, from the still-image transfer model, finds more of the cracks, which do not move. Measured on
three foreign lines (docs/new_line.md, "Crack scores from a still-image network"), the mean of the two networks'
crack probabilities found more cracks than either network alone, particles unchanged.

``PairNet`` runs both on the same input: the sequence network on all K frames, the still network on frame 0. Its
outputs have VialNet's form, so training, calibration, export, the station and the review app take it as they
take one network:
- particle and fill level (class, map, rows) and the anomaly context: the sequence network's;
- crack: the mean of the two networks' probabilities for every map cell, as a logit; the class score is that
  map's peak (``crack="map_peak"``, pairs built since 2026-12-07), as a single network's particle and crack scores
  are its map's peak: both networks must see the crack in the same place. Pairs built before take the mean of
  the two networks' own peaks (``crack="mean"``), which two networks seeing two different places also raise
  (a scratch here, a bubble there); their records say so and they are rebuilt as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import VialNet, adapt_first_layer

PAIR_ARCH = "VialNetPair"
CRACK = 1  # the crack channel of the class logits and maps (vision.model.CLASSES)
CRACK_RULES = ("map_peak", "mean")  # how the pair's crack class score is made (see the module's docstring)
CRACK_RULE = "map_peak"  # what a new pair takes


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Written out: torch.logaddexp has no ONNX export.
    m = torch.maximum(a, b)
    return m + torch.log1p(torch.exp(-(a - b).abs()))


def mean_probability_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logit((sigmoid(a) + sigmoid(b)) / 2), exact and finite for any logits (no log of a probability that
    rounded to 0 or 1): log p = logaddexp(log sigmoid a, log sigmoid b) - log 2, and the same for 1 - p."""
    log_p = _logaddexp(-F.softplus(-a), -F.softplus(-b))
    log_q = _logaddexp(-F.softplus(a), -F.softplus(b))
    return log_p - log_q  # the two log 2 terms cancel


class PairNet(nn.Module):
    """The sequence network and the still network (see the module's docstring)."""

    def __init__(self, sequence: VialNet, still: VialNet, crack: str = CRACK_RULE):
        super().__init__()
        if still.frames != 1:
            raise ValueError(f"the still network takes one frame, this one {still.frames}")
        if crack not in CRACK_RULES:
            raise ValueError(f"unknown crack rule {crack!r} for a pair; known: {', '.join(CRACK_RULES)}")
        self.sequence, self.still = sequence, still
        self.frames = sequence.frames
        self.crack = crack

    def arch(self) -> dict:
        return {"arch": PAIR_ARCH, "frames": self.frames, "crack": self.crack,
                "sequence": self.sequence.arch(), "still": self.still.arch()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_features(x)[:3]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        class_logits, maps, row_logits, ctx = self.sequence.forward_features(x)
        s_class, s_maps, _, _ = self.still.forward_features(x[:, :1])
        crack_map = mean_probability_logit(maps[:, CRACK:CRACK + 1], s_maps[:, CRACK:CRACK + 1].to(maps))
        if self.crack == "map_peak":
            crack = crack_map.amax((2, 3)).to(class_logits)
        else:
            crack = mean_probability_logit(class_logits[:, CRACK:CRACK + 1],
                                           s_class[:, CRACK:CRACK + 1].to(class_logits))
        class_logits = torch.cat([class_logits[:, :CRACK], crack, class_logits[:, CRACK + 1:]], 1)
        maps = torch.cat([maps[:, :CRACK], crack_map, maps[:, CRACK + 1:]], 1)
        return class_logits, maps, row_logits, ctx


Network = VialNet | PairNet


def is_pair_arch(arch: dict | None) -> bool:
    return bool(arch) and arch.get("arch") == PAIR_ARCH


def has_arch(arch: dict | None) -> bool:
    """Whether an ``arch()`` record describes its network (records of the first models do not)."""
    return is_pair_arch(arch) or bool((arch or {}).get("widths"))


def network_from_arch(arch: dict, frames: int | None = None, nuisance: bool = False) -> Network:
    """The network an ``arch()`` record describes, optionally for another frame count (a pair's sequence network
    takes it; its still network keeps one frame) and with a nuisance head added (``nuisance``)."""
    if is_pair_arch(arch):
        seq, still = arch["sequence"], arch["still"]
        return PairNet(network_from_arch(seq, frames or arch["frames"], nuisance),
                       network_from_arch(still, 1, nuisance), crack=str(arch.get("crack", "mean")))
    return VialNet.from_arch({**arch, "nuisance": bool(arch.get("nuisance")) or nuisance}, frames)


def adapt_state(state: dict, frames_to: int) -> dict:
    """``adapt_first_layer`` for either network: a pair's sequence network takes the new frame count."""
    if not any(k.startswith("sequence.") for k in state):
        return adapt_first_layer(state, frames_to)
    seq = {k.removeprefix("sequence."): v for k, v in state.items() if k.startswith("sequence.")}
    rest = {k: v for k, v in state.items() if not k.startswith("sequence.")}
    return {**rest, **{f"sequence.{k}": v for k, v in adapt_first_layer(seq, frames_to).items()}}


def stem_key(state: dict) -> str:
    """The key of the stem's weights (the sequence network's in a pair): its shape tells the frame count."""
    return "sequence.stem.0.weight" if "sequence.stem.0.weight" in state else "stem.0.weight"


def subnetworks(net: nn.Module) -> list[nn.Module]:
    """The VialNets a network is made of (for freezing parts by name in each)."""
    return [net.sequence, net.still] if isinstance(net, PairNet) else [net]


def pair_state(sequence_state: dict, still_state: dict) -> dict:
    """A pair's state dict from its two networks' state dicts."""
    return {**{f"sequence.{k}": v for k, v in sequence_state.items()},
            **{f"still.{k}": v for k, v in still_state.items()}}
