"""VialNet: one compact, fully convolutional CNN for a container's K stacked frames.

Outputs, for a batch of containers:
- ``class_logits`` (B, 3): particle, crack, fill_level;
- ``map_logits`` (B, 3, H/8, W/8): coarse localisation per class (0.32 mm cells at 40 µm/px), supervised by
  the simulator's masks; the particle and crack logits are their map's maximum, so a particle is found
  where it is and the evidence of a 3-pixel particle is not averaged away (fill level adds a global term);
- ``row_logits`` (B, 2, H/4): where along the image rows the liquid surface and the container's lowest
  point are. A soft-argmax turns them into rows with sub-cell precision and the fill height in mm.

Fully convolutional: one model serves every container format (image size), given the same pixel scale.
The 2x2 pixel unshuffle at the input keeps every pixel's information while the convolutions run at half
resolution; this is what keeps training on two CPU cores affordable at native resolution.

A motion branch (``MotionBranch``) tells the map head which way things move between frames, farther than the
stem sees: a particle sinks, a bubble rises. A contrast branch (``ContrastBranch``) gives the trunk what is on
the glass relative to the light behind it, so a crack across a dark band looks as it does on the bright body.

The input stage (motion channels, unshuffle, the stem's 3x3 convolution) is linear, so it runs as one 6x6
convolution with stride 2 on the raw frames, its kernel composed from the stem's weights at every call: the
same function and the same parameters (gradients flow to ``stem.0.weight``), at a fraction of the cost. The
unshuffle's six-dimensional transpose alone took a third of an ONNX Runtime batch-1 run (10 of 28 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("particle", "crack", "fill_level")
MOTION_GAIN = 2.0  # frame differences are small next to the frames themselves
# The motion branch's cells are 4 rows by 8 columns of input pixels. Rows stay finer because the vertical
# direction is what tells a sinking particle from a rising bubble; columns are pooled wide because the
# liquid's swirl carries every object sideways by up to ~90 px between frames.
MOTION_SWIRL_CELLS = 7  # a column max over +-7 cells (+-56 px) finds the same object in the next frame
MOTION_WIDTH = 16
CONTRAST_WIDTH = 16
CONTRAST_FLOOR = 0.02  # grey level (of 1) under which the background counts as black: noise is not contrast
CONTRAST_CLIP = 4.0


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def half_frames(x: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, H/2, W/2) frames and (B, 1, H/2, W/2) mean frame at half resolution, as the branches take them;
    ``x`` is (B, K, H, W), ``box`` (K, 1, 2, 2) of 0.25.

    A 2x2 mean keeps a particle's contrast against the noise (both halve for a one-pixel line) and makes the
    branches four times cheaper; both branches share it, computed once. It is computed by the operation each
    engine runs fastest: on channels-last tensors (training on the CPU) a grouped convolution is ~8x faster than
    avg_pool2d; on NCHW tensors (evaluation, and the exported graph, where ONNX Runtime's AveragePool adds 0.2 ms
    to a batch-1 vial-2R run against 2.6 ms for the convolution's layout changes) avg_pool2d is ~5x faster than
    the convolution. A test checks they agree. The mean over frames runs after the pooling, on a quarter of the
    pixels."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        h = F.conv2d(x, box, stride=2, groups=x.shape[1])
    else:
        h = F.avg_pool2d(x, 2)
    return h, h.mean(1, keepdim=True)


class MotionBranch(nn.Module):
    """Which way things move between frames, over distances the stem cannot see.

    A particle sinks and a bubble rises; the swirl carries both sideways. Between two frames 40 ms apart an
    object moves 5-45 px up or down and up to ~90 px across, so the linear stem (6 px) cannot relate its
    positions, and the deeper features that could are coarse and learn it slowly. The branch takes, per frame,
    where the frame is darker and where it is brighter than the mean of the K frames (after matching each
    frame's exposure to the mean), keeps the strongest response in each 4x8-pixel cell and, across columns,
    within the swirl's reach, then learns vertical patterns across frames: dark at row y in frame k and at
    y + d in frame k+1 is an object moving by d. Its features join the map head's context at 1/8 resolution.
    """

    def __init__(self, frames: int, width: int = MOTION_WIDTH):
        super().__init__()
        self.width = width
        self.vertical = nn.Sequential(  # +-16 px of rows per frame pair at 4 px rows
            nn.Conv2d(2 * frames, width, (9, 3), padding=(4, 1), bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.down = nn.Sequential(  # to the map's 1/8 rows, reaching +-16 px further
            nn.Conv2d(width, width, (5, 3), stride=(2, 1), padding=(4, 1), dilation=(2, 1), bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, half: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``half``, ``mean``: float32 from ``half_frames``; ``dtype``: the trunk's (under mixed precision)."""
        with torch.no_grad(), torch.autocast(device_type=half.device.type, enabled=False):
            r = self.pooled(half, mean)
        return self.down(self.vertical(r.to(dtype)))

    @staticmethod
    def pooled(x: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
        """(B, 2K, H/4, W/8): per frame, how much darker and how much brighter than the mean frame each cell
        gets, spread across the swirl's reach. ``x`` and ``x_mean`` are the half-resolution frames and their
        mean (``half_frames``) of (grey - 0.5) / 0.25, padded to multiples of 32 px."""
        # Exposure scales grey levels, so frame k's gain against the mean frame is the ratio of their mean
        # grey levels, and 4 (grey_k - gain_k grey_mean) = x_k - gain_k x_mean + 2 (1 - gain_k).
        grey = x.mean((2, 3), keepdim=True) * 0.25 + 0.5
        gain = grey / grey.mean(1, keepdim=True).clamp_min(1e-3)
        d = torch.addcmul(2.0 * (1.0 - gain), x_mean, gain, value=-1.0) + x
        # Darker than the mean (an object is here) and brighter (it was here). The ReLU commutes with the
        # cell maximum, so it runs after it, on an eighth of the pixels.
        r = torch.cat([-d, d], 1)
        # The max over each 4x8-pixel cell (2x4 here) as halvings of strided views: exact, and ~6x faster
        # than max_pool2d on the CPU. Padded inputs are multiples of 32 px, so the halves always pair up.
        if torch.onnx.is_in_onnx_export():
            # ONNX Runtime copies each strided slice; its MaxPool does the same in one pass.
            r = F.max_pool2d(r, (2, 4))
        else:
            r = torch.maximum(r[..., 0::2, :], r[..., 1::2, :])
            r = torch.maximum(r[..., 0::2], r[..., 1::2])
            r = torch.maximum(r[..., 0::2], r[..., 1::2])
        r = r.relu().contiguous(memory_format=torch.channels_last)  # max_pool2d is ~3x faster so
        k = 2 * MOTION_SWIRL_CELLS + 1
        return F.max_pool2d(r, (1, k), stride=1, padding=(0, MOTION_SWIRL_CELLS))


class ContrastBranch(nn.Module):
    """What is on the glass, whatever the light behind it: the mean frame's contrast against its local
    background, (grey - background) / (background + CONTRAST_FLOOR).

    Glass marks and cracks are static, so they live in the mean frame; but they darken the light by a fraction,
    and a crack across the dark band of a shoulder or neck changes the grey level a tenth as much as the same
    crack on the bright body. Relative contrast shows both alike. Its features join the trunk at 1/4.
    """

    def __init__(self, width: int = CONTRAST_WIDTH):
        super().__init__()
        self.width = width
        self.convs = nn.Sequential(_cbr(1, width, 2), _cbr(width, width))

    def forward(self, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``mean``: the float32 half-resolution mean frame from ``half_frames``; ``dtype``: the trunk's."""
        with torch.no_grad(), torch.autocast(device_type=mean.device.type, enabled=False):
            c = self.contrast(mean)
        return self.convs(c.to(dtype))

    @staticmethod
    def contrast(mean: torch.Tensor) -> torch.Tensor:
        """(B, 1, H/2, W/2) relative contrast of the half-resolution mean frame (``half_frames``, of
        (grey - 0.5) / 0.25) against a 14-px neighbourhood."""
        g = mean * 0.25 + 0.5
        bg = F.avg_pool2d(g, 7, stride=1, padding=3, count_include_pad=False)
        return ((g - bg) / (bg.clamp_min(0.0) + CONTRAST_FLOOR)).clamp(-CONTRAST_CLIP, CONTRAST_CLIP)


# VialNet's parts by attribute name, as fine-tuning may freeze them (TrainConfig.frozen).
FREEZABLE = ("stem", "s2", "s3", "s4", "s5", "motion", "contrast", "map_head", "global_head", "row_head",
             "nuisance_head")
MAP_HEAD_WIDTH = 32
MAP_HEADS = ("dense", "separable")


def _map_head(cin: int, head: str) -> nn.Sequential:
    """The class maps from the 1/8 context. "dense": a 3x3 convolution over all context channels, the costliest
    layer of the original network (a quarter of its compute); "separable": the same 3x3 reach per channel, then a
    1x1 mix, a seventh of the cost."""
    if head == "dense":
        first = _cbr(cin, MAP_HEAD_WIDTH)
    elif head == "separable":
        first = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                              nn.Conv2d(cin, MAP_HEAD_WIDTH, 1, bias=False),
                              nn.BatchNorm2d(MAP_HEAD_WIDTH), nn.ReLU(inplace=True))
    else:
        raise ValueError(f"map head must be one of {', '.join(MAP_HEADS)}, got {head!r}")
    return nn.Sequential(first, nn.Conv2d(MAP_HEAD_WIDTH, len(CLASSES), 1))


NUISANCE_WIDTH = 16
NUISANCE_PRIOR = -4.0  # softplus(-4) = 0.018: a new head takes 0.018 off a logit, a shift no threshold notices


class NuisanceHead(nn.Module):
    """Learned suppression of the particle and crack maps where a nuisance the reviews named lies.

    Added when a model is retrained from reviewed false rejects (``TrainConfig.nuisance_head``): from the same
    1/8 context as the map head it computes a non-negative amount per cell and class that is taken off the
    particle and crack logits. With the rest of the network frozen, the retrained model's maps are the
    champion's everywhere the head stays at its prior, and can only be lower where it learnt a nuisance. Measured
    on the retraining demonstration it did not learn silicone oil apart from particles: it took evidence off both
    (docs/retraining.md), so it is off by default."""

    def __init__(self, cin: int, width: int = NUISANCE_WIDTH):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(cin, width, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, 2, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, NUISANCE_PRIOR)

    def forward(self, ctx: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        cut = F.softplus(self.net(ctx).to(maps.dtype))
        return torch.cat([maps[:, :2] - cut, maps[:, 2:]], 1)


class VialNet(nn.Module):
    def __init__(self, frames: int = 4, widths: tuple[int, ...] = (16, 24, 32, 48, 64), motion: bool = False,
                 contrast: bool = False, branch_width: int = MOTION_WIDTH, head: str = "dense",
                 nuisance: bool = False):
        super().__init__()
        w = widths
        self.frames = frames
        self.widths = tuple(widths)
        self.branch_width = int(branch_width)
        self.head = head
        # The motion branch needs frames to compare; with one frame the flag is ignored.
        self.motion = MotionBranch(frames, self.branch_width) if motion and frames > 1 else None
        mw = self.branch_width if self.motion is not None else 0
        self.contrast = ContrastBranch(self.branch_width) if contrast else None
        cw = self.branch_width if self.contrast is not None else 0
        self.register_buffer("box", torch.full((frames, 1, 2, 2), 0.25), persistent=False)  # see half_frames
        self.stem = _cbr(4 * self.in_channels(frames), w[0])  # 1/2
        self.s2 = nn.Sequential(_cbr(w[0], w[1], 2), _cbr(w[1], w[1]))  # 1/4
        self.s3 = nn.Sequential(_cbr(w[1] + cw, w[2], 2), _cbr(w[2], w[2]))  # 1/8
        self.s4 = nn.Sequential(_cbr(w[2], w[3], 2), _cbr(w[3], w[3], dilation=2))  # 1/16
        self.s5 = nn.Sequential(_cbr(w[3], w[4], 2), _cbr(w[4], w[4], dilation=2))  # 1/32
        self.map_head = _map_head(w[2] + w[3] + w[4] + mw, head)
        self.nuisance_head = NuisanceHead(w[2] + w[3] + w[4] + mw) if nuisance else None
        self.global_head = nn.Linear(2 * w[4], len(CLASSES))
        nn.init.zeros_(self.global_head.weight)
        nn.init.zeros_(self.global_head.bias)
        self.register_buffer("global_mask", torch.tensor([0.0, 0.0, 1.0]), persistent=False)
        # Rows: column-pooled features at 1/4 plus upsampled context, then dilated 1-D convolutions
        # (receptive field ~ 10 mm) so the surface is told apart from other dark bands (shoulder, stopper).
        rc = 2 * w[1] + 2 * w[3]
        self.row_head = nn.Sequential(
            nn.Conv1d(rc, 48, 5, padding=2), nn.ReLU(inplace=True),
            nn.Conv1d(48, 48, 5, padding=4, dilation=2), nn.ReLU(inplace=True),
            nn.Conv1d(48, 48, 5, padding=8, dilation=4), nn.ReLU(inplace=True),
            nn.Conv1d(48, 48, 5, padding=16, dilation=8), nn.ReLU(inplace=True),
            nn.Conv1d(48, 2, 1),
        )
        # A prior towards "nothing there": defects are rare per map cell.
        nn.init.constant_(self.map_head[-1].bias, -4.0)

    def arch(self) -> dict:
        """What rebuilds this network (recorded in checkpoints and packages)."""
        return {"arch": "VialNet", "frames": self.frames, "widths": list(self.widths),
                "motion": self.motion is not None, "contrast": self.contrast is not None,
                "branch_width": self.branch_width, "head": self.head, "nuisance": self.nuisance_head is not None}

    @classmethod
    def from_arch(cls, arch: dict, frames: int | None = None) -> VialNet:
        """The network an ``arch()`` record describes (older records have no motion or contrast branch, 16-channel
        branches, the dense map head and no nuisance head), optionally for another frame count."""
        return cls(frames=int(frames or arch["frames"]), widths=tuple(arch["widths"]),
                   motion=bool(arch.get("motion", False)), contrast=bool(arch.get("contrast", False)),
                   branch_width=int(arch.get("branch_width", MOTION_WIDTH)), head=str(arch.get("head", "dense")),
                   nuisance=bool(arch.get("nuisance", False)))

    @staticmethod
    def in_channels(frames: int) -> int:
        return frames + 1 if frames > 1 else 1

    def motion_mix(self) -> torch.Tensor:
        """(groups, K): the channels the stem sees, [mean frame, each frame minus the mean], as weights on the
        frames. What moves between frames (particles, bubbles) stands out of a flat background in the
        differences, what stays (glass marks, cracks) lives in the mean. The network could learn this; giving
        it explicitly makes small moving objects easy to learn."""
        k = self.frames
        if k == 1:
            return torch.ones(1, 1)
        eye = torch.eye(k)
        return torch.cat([torch.full((1, k), 1.0 / k), MOTION_GAIN * (eye - 1.0 / k)], 0)

    def input_kernel(self) -> torch.Tensor:
        """The stem's weights as one (w0, K, 6, 6) kernel over the raw frames (see the module's docstring).
        pixel_shuffle puts unshuffled channel g*4 + di*2 + dj back at pixel (di, dj) of its 2x2 cell."""
        w = self.stem[0].weight
        w6 = F.pixel_shuffle(w, 2)  # (w0, groups, 6, 6)
        return torch.einsum("ogab,gk->okab", w6, self.motion_mix().to(w))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_features(x)[:3]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward``'s outputs and the 1/8 context the class maps are computed from (B, C, H/8, W/8): what the
        good-only anomaly model (``vision.anomaly``) compares with the line's good units."""
        f1 = self.stem[2](self.stem[1](F.conv2d(x, self.input_kernel(), stride=2, padding=2)))
        f2 = self.s2(f1)
        if self.motion is not None or self.contrast is not None:
            # Nothing to learn before the branches' convolutions; float32 because motion is a few grey levels.
            with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                half, mean = half_frames(x.float(), self.box)
        f3 = self.s3(f2 if self.contrast is None else torch.cat([f2, self.contrast(mean, x.dtype)], 1))
        f4 = self.s4(f3)
        f5 = self.s5(f4)
        size3 = f3.shape[-2:]
        parts = [f3, F.interpolate(f4, size=size3, mode="nearest"), F.interpolate(f5, size=size3, mode="nearest")]
        if self.motion is not None:
            parts.append(self.motion(half, mean, x.dtype))
        ctx = torch.cat(parts, 1)
        maps = self.map_head(ctx)
        if self.nuisance_head is not None:
            maps = self.nuisance_head(ctx, maps)
        g = torch.cat([f5.mean((2, 3)), f5.amax((2, 3))], 1)
        # Particles and cracks are local: their logit is the map's peak, so a false peak anywhere is what the
        # image-level loss pushes down. Fill level is global: it also gets a pooled-feature term.
        class_logits = maps.amax((2, 3)) + self.global_head(g) * self.global_mask
        # Row profile: mean and max over columns. The fill height wants sub-pixel rows, more than bfloat16's
        # 8-bit mantissa gives: under mixed-precision training this small 1-D head stays in its weights' type.
        dt = self.row_head[0].weight.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            f2, f4 = f2.to(dt), f4.to(dt)
            r2 = torch.cat([f2.mean(3), f2.amax(3)], 1)
            r4 = torch.cat([f4.mean(3), f4.amax(3)], 1)
            r4 = F.interpolate(r4.unsqueeze(-1), size=(r2.shape[-1], 1), mode="nearest").squeeze(-1)
            row_logits = self.row_head(torch.cat([r2, r4], 1))
        return class_logits, maps, row_logits, ctx


ROW_STRIDE = 4


def soft_rows(row_logits: torch.Tensor) -> torch.Tensor:
    """Expected image row (px) of each row channel: (B, 2, R) -> (B, 2). ONNX-friendly (no arange)."""
    p = torch.softmax(row_logits, dim=-1)
    idx = torch.cumsum(torch.ones_like(p), dim=-1) - 1.0  # 0, 1, 2, ... without a dynamic arange
    return (p * (idx * ROW_STRIDE + (ROW_STRIDE - 1) / 2.0)).sum(-1)


class InferenceModel(nn.Module):
    """What gets exported: probabilities, localisation maps in [0, 1] and the fill height in mm."""

    def __init__(self, net: VialNet, mm_per_px: float, features: bool = False):
        super().__init__()
        self.net, self.features = net, features
        self.register_buffer("mm_per_px", torch.tensor(float(mm_per_px)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        class_logits, maps, row_logits, ctx = self.net.forward_features(x)
        rows = soft_rows(row_logits)
        fill_height = (rows[:, 1] - rows[:, 0]) * self.mm_per_px
        out = (torch.sigmoid(class_logits), torch.sigmoid(maps), fill_height)
        if not self.features:
            return out
        # The context averaged over 3 x 3 cells: a cell's neighbourhood, so that a defect on a cell's edge counts
        # in both cells (``vision.anomaly.FEATURES``); float32 whatever the graph's precision.
        return (*out, F.avg_pool2d(ctx.float(), 3, stride=1, padding=1, count_include_pad=False))


def adapt_first_layer(state: dict, frames_to: int) -> dict:
    """Re-shape a checkpoint's stem for another number of frames (e.g. a 4-frame simulator model as the
    starting point of a 1-frame model on real still images). The stem sees [mean, differences...]: the
    mean's weights carry over; difference weights are dropped (one frame has no motion) or start at zero
    (new frames), so a still scene gives exactly the same response."""
    key = "stem.0.weight"
    w = state[key]
    cout, cin, kh, kw = w.shape
    groups_from = cin // 4
    groups_to = VialNet.in_channels(frames_to)
    if groups_from == groups_to:
        return state
    g = w.reshape(cout, groups_from, 4, kh, kw)
    new = torch.zeros(cout, groups_to, 4, kh, kw, dtype=w.dtype)
    new[:, 0] = g[:, 0]
    n = min(groups_from, groups_to)
    if n > 1:
        new[:, 1:n] = g[:, 1:n]
    state = dict(state)
    state[key] = new.reshape(cout, 4 * groups_to, kh, kw)
    # The motion branch compares frames: one frame has none (its weights are dropped); another count keeps the
    # weights of the frames both have (dark responses first, then bright), new frames start at zero.
    mkey = "motion.vertical.0.weight"
    if mkey in state:
        if frames_to == 1:
            width = state["motion.down.0.weight"].shape[0]
            state = {k: v for k, v in state.items() if not k.startswith("motion.")}
            # The map head's context loses the branch's channels (the last ones): the dense head's 3x3 kernel
            # over them, or the separable head's per-channel kernels and its 1x1 mix's weights on them.
            if state["map_head.0.1.weight"].dim() == 4:  # the separable head (the dense one has BN there)
                state["map_head.0.0.weight"] = state["map_head.0.0.weight"][:-width]
                state["map_head.0.1.weight"] = state["map_head.0.1.weight"][:, :-width]
            else:
                state["map_head.0.0.weight"] = state["map_head.0.0.weight"][:, :-width]
            if "nuisance_head.net.0.weight" in state:
                state["nuisance_head.net.0.weight"] = state["nuisance_head.net.0.weight"][:, :-width]
        else:
            mw = state[mkey]
            kf = mw.shape[1] // 2
            m = torch.zeros(mw.shape[0], 2, frames_to, *mw.shape[2:], dtype=mw.dtype)
            n = min(kf, frames_to)
            m[:, :, :n] = mw.reshape(mw.shape[0], 2, kf, *mw.shape[2:])[:, :, :n]
            state[mkey] = m.reshape(mw.shape[0], 2 * frames_to, *mw.shape[2:])
    return state
