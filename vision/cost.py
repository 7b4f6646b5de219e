"""What one container costs the network: floating-point operations of a forward pass.

Counted as 2 FLOP per multiply-add of every convolution and linear layer, plus the input stage, which runs as one
functional convolution with a kernel composed from the stem's weights (``VialNet.input_kernel``; no module to
hook). Pooling, activations and normalisation are left out: a few percent of the total, and not what sets the
speed on a CPU whose matrix-product units do the convolutions. The same count is recorded in every model package
(``cost``) and printed by ``benchmarks/runtime.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import VialNet
from .pair import Network, PairNet


def model_gflop(net: Network, frames: int, h: int, w: int) -> float:
    """GFLOP of one container of ``frames`` frames of ``h`` x ``w`` pixels (already padded as the input spec pads);
    a pair's is its sequence network's on the frames and its still network's on the first."""
    if isinstance(net, PairNet):
        return model_gflop(net.sequence, frames, h, w) + model_gflop(net.still, 1, h, w)
    return _vialnet_gflop(net, frames, h, w)


def _vialnet_gflop(net: VialNet, frames: int, h: int, w: int) -> float:
    flop = 0

    def count(m, _inp, out):
        nonlocal flop
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            flop += 2 * out.numel() * int(np.prod(m.weight.shape[1:]))
        elif isinstance(m, torch.nn.Linear):
            flop += 2 * out.numel() * m.in_features

    hooks = [m.register_forward_hook(count) for m in net.modules()]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, frames, h, w))
    finally:
        net.train(was_training)
        for hk in hooks:
            hk.remove()
    k = net.input_kernel()
    flop += 2 * k.shape[0] * int(np.prod(k.shape[1:])) * (h // 2) * (w // 2)
    return flop / 1e9


def padded(size: int, multiple: int) -> int:
    """A frame side padded up to ``multiple`` (what ``preprocess`` does)."""
    return -(-int(size) // multiple) * multiple
