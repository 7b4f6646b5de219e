"""The network's shapes and heads, the one preprocessing function, and first-layer adaptation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vialinspect.vision.model import (
    CONTRAST_CLIP,
    CONTRAST_FLOOR,
    MOTION_GAIN,
    MOTION_SWIRL_CELLS,
    ContrastBranch,
    InferenceModel,
    MotionBranch,
    VialNet,
    adapt_first_layer,
    half_frames,
    soft_rows,
)
from vialinspect.vision.preprocess import InputSpec, preprocess


@pytest.mark.parametrize("frames,h,w", [(4, 128, 96), (1, 160, 64), (2, 96, 224)])
@pytest.mark.parametrize("motion,contrast", [(False, False), (True, False), (True, True)])
def test_vialnet_output_shapes(frames, h, w, motion, contrast):
    net = VialNet(frames, widths=(8, 8, 8, 8, 8), motion=motion, contrast=contrast).eval()
    assert (net.motion is not None) == (motion and frames > 1) and (net.contrast is not None) == contrast
    cls, maps, rows = net(torch.zeros(2, frames, h, w))
    assert cls.shape == (2, 3) and maps.shape == (2, 3, h // 8, w // 8) and rows.shape == (2, 2, h // 4)


@pytest.mark.parametrize("frames", [1, 4])
def test_input_stage_runs_as_one_convolution_with_the_same_function_and_gradients(frames):
    torch.manual_seed(0)
    net = VialNet(frames=frames).double().eval()  # double: the comparison is of the algebra, not of rounding
    x = torch.randn(2, frames, 64, 96, dtype=torch.float64)

    def explicit(x):  # the documented stage written out: motion channels, 2x2 unshuffle, 3x3 conv
        if frames > 1:
            mean = x.mean(1, keepdim=True)
            x = torch.cat([mean, (x - mean) * MOTION_GAIN], 1)
        return F.conv2d(F.pixel_unshuffle(x, 2), net.stem[0].weight, padding=1)

    composed = F.conv2d(x, net.input_kernel(), stride=2, padding=2)
    assert torch.allclose(composed, explicit(x), atol=1e-10)
    composed.square().sum().backward()
    g1 = net.stem[0].weight.grad.clone()
    net.zero_grad()
    explicit(x).square().sum().backward()
    assert torch.allclose(g1, net.stem[0].weight.grad, rtol=1e-10, atol=1e-8)


def test_soft_rows_recovers_a_peaked_row():
    logits = torch.full((1, 2, 50), -30.0)
    logits[0, 0, 10] = 30.0
    logits[0, 1, 40] = 30.0
    rows = soft_rows(logits)
    assert rows[0, 0].item() == pytest.approx(10 * 4 + 1.5, abs=1e-3)
    assert rows[0, 1].item() == pytest.approx(40 * 4 + 1.5, abs=1e-3)
    model = InferenceModel(VialNet(1, widths=(8, 8, 8, 8, 8)), mm_per_px=0.04).eval()
    _, _, h = model(torch.zeros(1, 1, 64, 64))
    assert h.shape == (1,)


def test_adapted_single_frame_model_matches_multi_frame_model_on_a_still_scene():
    torch.manual_seed(0)
    four = VialNet(4, widths=(8, 8, 8, 8, 8)).eval()
    one = VialNet(1, widths=(8, 8, 8, 8, 8)).eval()
    one.load_state_dict(adapt_first_layer(four.state_dict(), 1))
    x = torch.randn(1, 1, 64, 96)
    a = four(x.repeat(1, 4, 1, 1))
    b = one(x)
    for u, v in zip(a, b, strict=True):
        assert torch.allclose(u, v, atol=1e-4)


def test_preprocess_handles_bit_depths_colour_and_padding():
    spec = InputSpec(frames=2, pad_multiple=32)
    g8 = np.full((50, 70), 255, np.uint8)
    g16 = np.full((50, 70), 65535, np.uint16)
    p = preprocess([g8, g16], spec)
    assert p.x.shape == (2, 64, 96) and (p.height, p.width, p.scale) == (50, 70, 1.0)
    assert np.allclose(p.x[:, :50, :70], (1.0 - spec.mean) / spec.std)
    colour = np.zeros((50, 70, 3), np.uint8)
    assert preprocess([colour, colour], spec).x.shape == (2, 64, 96)


def test_preprocess_8bit_table_path_is_the_general_path_bit_for_bit():
    rng = np.random.default_rng(5)
    spec = InputSpec(frames=3, pad_multiple=32, mean=0.45, std=0.3)
    frames = [rng.integers(0, 256, (37, 50), dtype=np.uint8) for _ in range(3)]
    fast = preprocess(frames, spec)  # 8-bit gray at native size: the lookup table
    general = preprocess([f.astype(np.float32) * (1 / 255.0) for f in frames], spec)  # float input
    assert fast.x.shape == general.x.shape == (3, 64, 64)
    assert np.array_equal(fast.x, general.x)  # padding included
    assert (fast.height, fast.width, fast.scale) == (general.height, general.width, general.scale)


def test_preprocess_rejects_mismatched_input_and_repeats_a_single_frame():
    spec = InputSpec(frames=3)
    with pytest.raises(ValueError, match="takes 3 frame"):
        preprocess([np.zeros((10, 10), np.uint8)] * 2, spec)
    with pytest.raises(ValueError, match="differ in size"):
        preprocess([np.zeros((10, 10), np.uint8), np.zeros((10, 12), np.uint8), np.zeros((10, 10), np.uint8)], spec)
    p = preprocess([np.arange(100, dtype=np.uint8).reshape(10, 10)], spec)
    assert np.array_equal(p.x[0], p.x[2])


def test_preprocess_reduces_large_images_and_reports_the_scale():
    spec = InputSpec(frames=1, max_side=256)
    p = preprocess([np.zeros((1024, 512), np.uint8)], spec)
    assert p.scale == 0.25 and (p.height, p.width) == (256, 128) and p.x.shape == (1, 256, 128)


def _motion_reference(x: torch.Tensor) -> torch.Tensor:
    """half_frames and MotionBranch.pooled written with the textbook operations."""
    p = F.avg_pool2d(x * 0.25 + 0.5, 2)  # grey levels at half resolution
    mean = p.mean(1, keepdim=True)
    gain = p.mean((2, 3), keepdim=True) / mean.mean((2, 3), keepdim=True)
    d = 4.0 * (p - gain * mean)
    r = F.max_pool2d(torch.cat([F.relu(-d), F.relu(d)], 1), (2, 4))
    k = MOTION_SWIRL_CELLS
    return F.max_pool2d(r, (1, 2 * k + 1), stride=1, padding=(0, k))


def test_motion_branch_input_is_the_documented_pooling(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 64, 96) * 0.3
    box = torch.full((4, 1, 2, 2), 0.25)
    got = MotionBranch.pooled(*half_frames(x, box))
    assert got.shape == (2, 8, 16, 12)
    assert torch.allclose(got, _motion_reference(x), atol=1e-5)
    # training's channels-last tensors take another operation for the 2x2 mean: the same values
    cl = MotionBranch.pooled(*half_frames(x.contiguous(memory_format=torch.channels_last), box))
    assert torch.allclose(cl, got, atol=1e-5)
    # and so does the exported graph, which takes the cell maximum as one pooling
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.equal(MotionBranch.pooled(*half_frames(x, box)), got)


def test_motion_branch_ignores_exposure_and_marks_where_an_object_moves():
    rng = np.random.default_rng(2)
    scene = torch.from_numpy(rng.uniform(0.5, 0.9, (1, 1, 64, 128)).astype(np.float32)).repeat(1, 4, 1, 1)
    gains = torch.tensor([0.95, 1.0, 1.05, 1.02]).view(1, 4, 1, 1)
    box = torch.full((4, 1, 2, 2), 0.25)
    still = MotionBranch.pooled(*half_frames((scene * gains - 0.5) / 0.25, box))
    assert still.abs().max() < 1e-4  # exposure changes alone are not motion
    moving = scene * gains
    for k, row in enumerate((12, 20, 28, 36)):  # a dark 3x3 object sinking 8 px a frame, at column 60
        moving[0, k, row:row + 3, 60:63] *= 0.3
    r = MotionBranch.pooled(*half_frames((moving - 0.5) / 0.25, box))[0]
    for k, row in enumerate((12, 20, 28, 36)):
        dark = r[k]  # darker than the mean: where the object is in frame k
        peak_row = int(dark.amax(1).argmax())
        assert peak_row in (row // 4, (row + 2) // 4)
        cols = torch.nonzero(dark[peak_row] > 0.5 * dark.max()).flatten()
        assert cols.min() <= 60 // 8 <= cols.max() and cols.max() - cols.min() <= 2 * MOTION_SWIRL_CELLS + 1
        assert r[4 + k, peak_row].max() < 0.2 * dark.max()  # and not brighter there


def test_architecture_records_rebuild_the_network_and_old_records_have_no_branches():
    net = VialNet(4, widths=(8, 8, 8, 8, 8), motion=True, contrast=True)
    again = VialNet.from_arch(net.arch())
    again.load_state_dict(net.state_dict())  # strict: the same parameters
    assert again.arch() == net.arch() == {"arch": "VialNet", "frames": 4, "widths": [8] * 5, "motion": True,
                                          "contrast": True, "branch_width": 16, "head": "dense",
                                          "nuisance": False}
    old = VialNet.from_arch({"arch": "VialNet", "frames": 4, "widths": [8] * 5})
    assert old.motion is None and old.contrast is None and old.head == "dense"
    # a record from before the branch width and the head were recorded: 16-channel branches, the dense head,
    # so a package of then still loads its weights
    before = {"arch": "VialNet", "frames": 4, "widths": [8] * 5, "motion": True, "contrast": True}
    VialNet.from_arch(before).load_state_dict(VialNet(4, (8,) * 5, motion=True, contrast=True).state_dict())
    cheap = VialNet(4, widths=(8, 8, 8, 8, 8), motion=True, contrast=True, branch_width=4, head="separable")
    VialNet.from_arch(cheap.arch()).load_state_dict(cheap.state_dict())
    with pytest.raises(ValueError, match="map head"):
        VialNet(4, widths=(8,) * 5, head="sparse")


def test_a_nuisance_head_starts_at_its_prior_and_can_only_lower_particle_and_crack_evidence():
    torch.manual_seed(0)
    plain = VialNet(4, widths=(8,) * 5, motion=True, contrast=True).eval()
    with_head = VialNet.from_arch({**plain.arch(), "nuisance": True}).eval()
    assert with_head.arch()["nuisance"] is True
    missing, unexpected = with_head.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("nuisance_head.") for k in missing)
    x = torch.randn(2, 4, 64, 96)
    with torch.no_grad():
        _, m0, r0 = plain(x)
        _, m1, r1 = with_head(x)
        cut = m0 - m1
        assert torch.allclose(cut[:, :2], torch.full_like(cut[:, :2], 0.01815), atol=1e-4)  # softplus(-4)
        assert torch.equal(cut[:, 2], torch.zeros_like(cut[:, 2])) and torch.equal(r0, r1)  # fill untouched
        # trained to anything, the head still only takes evidence away
        for p in with_head.nuisance_head.parameters():
            p.normal_(0, 1.0)
        _, m2, _ = with_head(x)
        assert (m2[:, :2] <= m0[:, :2] + 1e-6).all() and torch.equal(m2[:, 2], m0[:, 2])
    # a single-frame adaptation drops the motion channels from the head's input as from the map head's
    one = VialNet(1, widths=(8,) * 5, contrast=True, nuisance=True)
    four = VialNet(4, widths=(8,) * 5, motion=True, contrast=True, nuisance=True)
    one.load_state_dict(adapt_first_layer(four.state_dict(), 1))


def test_what_a_container_costs_the_default_network_and_the_earlier_one():
    """Issue 28's count, as benchmarks/runtime.py and the packages' ``cost`` count it (the 928 x 480 padded vial-2R
    frame at 40 µm/px, 4 frames): the training defaults' network is under 1 GFLOP; the earlier default's (and
    VialNet's own defaults, which old packages without these keys are read with) cost 2.42."""
    from vialinspect.training.config import TrainConfig
    from vialinspect.vision.cost import model_gflop

    c = TrainConfig()
    net = VialNet(4, c.widths, motion=c.motion_branch, contrast=c.contrast_branch, branch_width=c.branch_width,
                  head=c.map_head)
    assert model_gflop(net, 4, 928, 480) == pytest.approx(0.949, abs=0.005)
    earlier = VialNet(4, (16, 24, 32, 48, 64), motion=True, contrast=True)
    assert model_gflop(earlier, 4, 928, 480) == pytest.approx(2.42, abs=0.01)
    # the count is of the network, not of its mode: a network left in training mode stays there
    net.train()
    model_gflop(net, 4, 64, 64)
    assert net.training


def test_the_shipped_default_costs_at_most_one_gflop_per_container():
    """Issue 28's bound on the committed package itself: what its record says and what its network counts."""
    import json

    from vialinspect.export.builtin import resolve_model_ref
    from vialinspect.vision.cost import model_gflop

    meta = json.loads((resolve_model_ref("builtin:default") / "model.json").read_text())
    recorded = meta["cost"]["gflop_per_container"]["vial-2R"]
    assert recorded <= 1.0
    net = VialNet.from_arch(meta["architecture"])
    assert model_gflop(net, meta["cost"]["frames"], 928, 480) == pytest.approx(recorded, abs=0.005)


def test_contrast_branch_sees_a_mark_alike_on_dark_and_bright_glass_whatever_the_exposure():
    def contrast(grey):
        x = (torch.from_numpy(grey)[None].repeat(1, 4, 1, 1) - 0.5) / 0.25
        return ContrastBranch.contrast(half_frames(x, torch.full((4, 1, 2, 2), 0.25))[1])[0, 0]

    grey = np.full((64, 128), 0.85, np.float32)
    grey[:, 64:] = 0.1  # a dark band, as behind a vial's shoulder
    grey[30:32, 20:40] *= 0.4  # the same mark (60% of the light taken) on the bright and the dark side
    grey[30:32, 84:104] *= 0.4
    c = contrast(grey)
    bright, dark = c[15, 10:20], c[15, 42:52]  # the mark's row at half resolution
    assert bright.min() < -0.4 and dark.min() < -0.4
    # alike up to the floor that keeps black from amplifying noise: 0.1 / (0.1 + CONTRAST_FLOOR) here
    assert float(dark.min()) == pytest.approx(float(bright.min()) * 0.1 / (0.1 + CONTRAST_FLOOR), rel=0.05)
    assert c[5:10, 5:25].abs().max() < 0.05 and c[5:10, 45:60].abs().max() < 0.05  # plain glass: nothing
    assert torch.allclose(contrast(grey * 0.8), c, atol=0.02)  # a darker exposure: the same contrast
    black = np.zeros((64, 128), np.float32)
    black[30:32, 20:40] = 0.004  # one grey level of noise in the stopper's black is not a mark
    assert contrast(black).abs().max() <= CONTRAST_CLIP and contrast(black).abs().max() < 0.5


@pytest.mark.parametrize("head", ["dense", "separable"])
@pytest.mark.parametrize("frames_to", [1, 2, 5])
def test_a_motion_model_adapts_to_another_frame_count(frames_to, head):
    torch.manual_seed(3)
    four = VialNet(4, widths=(8, 8, 8, 8, 8), motion=True, contrast=True, branch_width=6, head=head).eval()
    other = VialNet.from_arch(four.arch(), frames_to).eval()
    other.load_state_dict(adapt_first_layer(four.state_dict(), frames_to))  # strict
    assert (other.motion is None) == (frames_to == 1)
    # the contrast branch sees the mean frame, whatever the frame count: its weights carry over unchanged
    assert torch.equal(other.contrast.convs[0][0].weight, four.contrast.convs[0][0].weight)
    if frames_to > 1:  # the frames both have keep their motion weights; new ones start at zero
        w4 = four.motion.vertical[0].weight.reshape(-1, 2, 4, 9, 3)
        w = other.motion.vertical[0].weight.reshape(-1, 2, frames_to, 9, 3)
        n = min(4, frames_to)
        assert torch.equal(w[:, :, :n], w4[:, :, :n]) and not w[:, :, n:].any()
