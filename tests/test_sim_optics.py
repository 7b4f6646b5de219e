"""Varied optics (``generate --optics varied``): each container through its own camera, recorded per record."""

import json

import numpy as np
import pytest

from vialinspect.cli import main
from vialinspect.datasets.generate import generate, make_container
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.sim.config import SimConfig
from vialinspect.datasets.sim.optics import CAMERA_RANGES, JPEG_SHARE, container_config, degrade, draw_camera

CFG = SimConfig(formats=("vial-2R",), frames=1, defect_rate=1.0, class_weights=(1.0, 0.0, 0.0), optics="varied")


def test_fixed_optics_leave_the_configuration_and_frames_alone():
    fixed = SimConfig(frames=1)
    assert container_config(fixed, 3, 0) is fixed
    frames = [np.full((8, 8), 100, np.uint8)]
    assert degrade(frames, fixed, 3, 0) is frames


def test_drawn_cameras_cover_the_ranges_and_are_reproducible():
    cams = [draw_camera(np.random.default_rng(i)) for i in range(200)]
    for name, (lo, hi) in CAMERA_RANGES.items():
        values = np.array([getattr(c, name) for c in cams])
        assert values.min() >= lo - 1e-6 and values.max() <= hi + 1e-6, name
        assert values.max() - values.min() > 0.6 * (hi - lo), f"{name} does not vary over its range"
    assert container_config(CFG, 5, 1) == container_config(CFG, 5, 1)
    assert container_config(CFG, 5, 1).camera != container_config(CFG, 6, 1).camera


def test_defect_sizes_follow_the_pixel_scale_and_plant_nuisances_are_on():
    for i in range(5):
        c = container_config(CFG, i, 0)
        k = c.camera.pixel_um / 40.0
        assert c.particle_size_um == pytest.approx((50.0 * k, 1000.0 * k))
        assert c.crack_length_mm == pytest.approx((0.5 * k, 6.0 * k))
        rates = dict(c.nuisance_rates)
        assert rates["lot_code"] > 0 and rates["silicone_oil"] > 0 and c.optics == "fixed"


def test_some_containers_go_through_jpeg_and_stay_grey_8_bit():
    rng = np.random.default_rng(0)
    frame = (rng.random((64, 48)) * 255).astype(np.uint8)
    changed = [not np.array_equal(degrade([frame], CFG, i, 0)[0], frame) for i in range(200)]
    assert abs(np.mean(changed) - JPEG_SHARE) < 0.12
    out = degrade([frame], CFG, changed.index(True), 0)[0]
    assert out.dtype == np.uint8 and out.shape == frame.shape


def test_unknown_optics_is_refused():
    with pytest.raises(ValueError, match="optics"):
        SimConfig(optics="zoom").validate()


def test_a_varied_dataset_records_each_containers_pixel_scale(tmp_path):
    generate(tmp_path / "ds", 6, CFG, seed=2, workers=1)
    ds = open_dataset(tmp_path / "ds")
    scales = [r.pixel_um for r in ds.records]
    assert len(set(scales)) == 6 and all(35.0 <= s <= 90.0 for s in scales)
    header = json.loads((tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()[0])
    assert header["simulator"]["optics"] == "varied"
    # The image size follows the drawn pixel scale: a coarser camera frames the same vial in fewer pixels.
    rec_a, frames_a, _ = make_container(CFG, 0, 2)
    h = frames_a[0].shape[0]
    assert rec_a.image_size[1] == h
    coarse = min(ds.records, key=lambda r: -r.pixel_um)
    fine = min(ds.records, key=lambda r: r.pixel_um)
    assert coarse.image_size[1] < fine.image_size[1]


def test_cli_generate_varied(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "v"), "--containers", "2", "--frames", "1", "--formats",
                 "syringe-1mL", "--optics", "varied", "--workers", "1"]) == 0
    assert len({r.pixel_um for r in open_dataset(tmp_path / "v").records}) == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--out", str(tmp_path / "w"), "--containers", "1", "--optics", "zoom"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--optics" in err and "Traceback" not in err
