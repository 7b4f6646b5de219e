"""The network's shapes and heads, the one preprocessing function, and first-layer adaptation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vision.model import MOTION_GAIN, InferenceModel, VialNet, adapt_first_layer, soft_rows
from vision.preprocess import InputSpec, preprocess


@pytest.mark.parametrize("frames,h,w", [(4, 128, 96), (1, 160, 64), (2, 96, 224)])
def test_vialnet_output_shapes(frames, h, w):
    net = VialNet(frames, widths=(8, 8, 8, 8, 8)).eval()
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
