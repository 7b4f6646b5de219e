"""``generate --like DIR``: a line's look (format, pixel scale, light, blur, noise, pose) read off its good units'
images by ``vialinspect.datasets.sim.look``, checked against the camera the units were rendered with.

Tolerances: each unit's own measures (scale, light, vignetting, blur) come out within a few tenths of a percent of
the truth on renders (benchmarks/look_fit.py), so the limits below are set by what a few units can tell. A spread
over units (exposure drift, gradient, jitter, tilt) from n units is known to about 1/sqrt(2n) of itself (18% at
n = 16), so it gets +-50%; the back light is a mean over log-normal exposures, drift/sqrt(n) = 2% here, so 5%.
"""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from tests.benchmark_module import benchmark
from vialinspect.cli import main
from vialinspect.datasets.generate import make_container
from vialinspect.datasets.imageio import write_png
from vialinspect.datasets.manifest import read_manifest
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.datasets.sim.formats import FORMATS as ALL_FORMATS
from vialinspect.datasets.sim.look import LOOK_NAME, LineLook, NotMeasured, estimate_look, look_of_folder, measure_unit
from vialinspect.datasets.sim.render import framing_for

CAM = CameraConfig(pixel_um=70.0, backlight_dn=190.0, blur_sigma_px=0.85, read_noise_dn=1.8, shot_noise_gain=0.045,
                   gradient=0.12, vignetting=0.22, exposure_drift=0.07)
FORMATS = ("vial-2R", "syringe-1mL")


def render(cam: CameraConfig, n: int, frames: int = 1, formats: tuple[str, ...] = FORMATS,
           seed: int = 3) -> list[list[np.ndarray]]:
    """``n`` good units (formats in turn), each a list of 8-bit frames."""
    out = []
    for i in range(n):
        cfg = SimConfig(formats=(formats[i % len(formats)],), frames=frames, defect_rate=0.0, camera=cam)
        out.append(make_container(cfg, i, seed)[1])
    return out


def within(est: float | None, true: float, rel: float) -> bool:
    return est is not None and abs(est - true) <= rel * true


@pytest.fixture(scope="module")
def stills() -> list[list[np.ndarray]]:
    return render(CAM, 16)


@pytest.fixture(scope="module")
def look(stills) -> LineLook:
    return estimate_look(stills)


def test_stills_give_the_camera(look):
    assert dict(look.format_counts) == {"vial-2R": 8, "syringe-1mL": 8}
    assert within(look.pixel_um, CAM.pixel_um, 0.01)
    assert within(look.backlight_dn, CAM.backlight_dn, 0.05)
    assert abs(look.vignetting - CAM.vignetting) < 0.02
    assert abs(look.blur_sigma_px - CAM.blur_sigma_px) < 0.1
    assert within(look.read_noise_dn, CAM.read_noise_dn, 0.15)
    assert within(look.shot_noise_gain, CAM.shot_noise_gain, 0.2)
    for k in ("gradient", "exposure_drift", "jitter_mm", "tilt_deg"):
        assert within(getattr(look, k), getattr(CAM, k), 0.5), (k, getattr(look, k))
    assert look.flicker is None  # one frame per unit: flicker cannot be told from exposure drift
    assert look.frames == 1 and look.n_units == 16 and look.n_unmeasured == 0
    fr = framing_for(ALL_FORMATS[look.format], CAM.pixel_um)
    assert look.image_hw == (fr.height, fr.width)


def test_look_round_trip_and_sim_config(look):
    again = LineLook.from_json(json.loads(json.dumps(look.to_json())))
    assert again == look
    base = SimConfig(frames=4, defect_rate=0.3, camera=CameraConfig(flicker=0.01))
    cfg = look.sim_config(base)
    assert cfg.formats == look.formats and cfg.frames == 1 and cfg.defect_rate == 0.3 and cfg.optics == "fixed"
    assert cfg.camera.pixel_um == look.pixel_um and cfg.camera.blur_sigma_px == look.blur_sigma_px
    assert cfg.camera.flicker == 0.01  # not measured on stills: the base's is kept
    cfg.validate()
    for bad, msg in (({**look.to_json(), "pixel_um": "x"}, "pixel_um must be a number"),
                     ({**look.to_json(), "format_id": "other"}, "not a line look"),
                     ({k: v for k, v in look.to_json().items() if k != "frames"}, "missing keys ['frames']"),
                     ({**look.to_json(), "formats": ["ampoule"]}, "unknown or no container formats")):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            LineLook.from_json(bad)


def test_known_pixel_scale_only_chooses_the_format(stills):
    look = estimate_look(stills[:6], pixel_um=70.0)
    assert look.pixel_um == 70.0 and set(look.formats) == set(FORMATS)
    narrowed = estimate_look(stills[:6], formats=("vial-2R", "vial-10R"))
    assert narrowed.format == "vial-2R" and "syringe-1mL" not in narrowed.formats


def test_a_container_the_simulator_lacks_does_not_pull_the_scale_between_two(stills):
    """Half the line's syringes are wider than the simulator's 1 mL one (here: rendered at 50 µm/px, so they read
    as 40% wider under a 70 µm/px camera, as a 2.25 mL syringe does): matched to the 1 mL format they give another
    scale. The line's scale must be one group's, not a median between the two, and the user is told."""
    wide = render(replace(CAM, pixel_um=50.0), 8, formats=("syringe-1mL",), seed=5)
    look = estimate_look(stills[:8] + wide)
    assert within(look.pixel_um, 70.0, 0.01) or within(look.pixel_um, 50.0, 0.01), look.pixel_um
    assert any("pixel scales disagree" in p and "--pixel-um" in p for p in look.problems), look.problems
    assert not any("disagree" in p for p in estimate_look(stills).problems)


def test_sequences_give_noise_and_flicker():
    cam = replace(CAM, pixel_um=80.0, flicker=0.01)
    look = estimate_look(render(cam, 8, frames=3, formats=("vial-10R",)))
    assert look.frames == 3 and look.formats == ("vial-10R",)
    assert within(look.read_noise_dn, cam.read_noise_dn, 0.15)
    assert within(look.shot_noise_gain, cam.shot_noise_gain, 0.2)
    assert within(look.flicker, cam.flicker, 0.5)


@pytest.mark.parametrize("encoding", ["png16", "jpeg_tint"])
def test_16_bit_and_colour_jpeg(stills, encoding):
    """What a line brings: 16-bit PNG (the render x 257 with dither) and colour JPEG (quality 90, tinted)."""
    with benchmark("worlds") as w:
        rng = np.random.default_rng(0)
        units = []
        for frames in stills[:8]:
            data = w.encode(frames[0], encoding, (0.92, 1.0, 1.06), rng)
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            assert img.dtype == (np.uint16 if encoding == "png16" else np.uint8)
            units.append([img])  # colour stays colour: estimate_look converts it to grey as read_gray does
    look = estimate_look(units)
    assert set(look.formats) == set(FORMATS)
    assert within(look.pixel_um, CAM.pixel_um, 0.01)
    assert within(look.backlight_dn, CAM.backlight_dn, 0.06)  # the tint's grey weight is 1.009
    assert abs(look.vignetting - CAM.vignetting) < 0.02
    assert abs(look.blur_sigma_px - CAM.blur_sigma_px) < 0.15
    # JPEG keeps 8 x 8 block means, not fine noise: the total noise at the back light is what is matched
    total = look.read_noise_dn ** 2 + (look.shot_noise_gain or 0.035) * CAM.backlight_dn
    assert within(total, CAM.read_noise_dn ** 2 + CAM.shot_noise_gain * CAM.backlight_dn, 0.25)
    assert any("JPEG" in p for p in look.problems) == (encoding == "jpeg_tint")


def test_units_without_a_container(stills):
    blank = [np.full((300, 200), 200, np.uint8)]
    with pytest.raises(NotMeasured, match="no container"):
        measure_unit(blank)
    look = estimate_look([*stills[:6], blank, blank])
    assert look.n_units == 8 and look.n_unmeasured == 2
    assert any(p.startswith("2 unit(s) not measured: no container") for p in look.problems)
    with pytest.raises(ValueError, match=r"^only 2 of 4 units showed a container to measure, 5 are needed"):
        estimate_look([*stills[:2], blank, blank])


def _line(root, units: list[list[np.ndarray]]) -> None:
    """An ImageFolder as a line hands it over: good units as frame folders in train/ and val/, a reject too."""
    for i, frames in enumerate(units):
        d = root / ("val" if i % 4 == 3 else "train") / "good" / f"u{i:03d}"
        d.mkdir(parents=True)
        for k, f in enumerate(frames):
            write_png(d / f"f{k}.png", f)
    reject = root / "train" / "crack" / "r000"
    reject.mkdir(parents=True)
    for k, f in enumerate(units[0]):
        write_png(reject / f"f{k}.png", np.zeros_like(f))


def test_cli_generate_like(tmp_path, capsys):
    cam = replace(CAM, pixel_um=80.0)
    line = tmp_path / "line"
    _line(line, render(cam, 8, frames=2, formats=("vial-2R",)))
    out = tmp_path / "sim"
    assert main(["generate", "--like", str(line), "--out", str(out), "--containers", "8", "--defect-rate", "0",
                 "--workers", "1", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "pixel_um" in printed and "measured on 8 of 8 units" in printed
    look = json.loads((out / LOOK_NAME).read_text())
    ds = read_manifest(out)
    assert ds.header["look"] == look and ds.header["frames_per_container"] == 2  # the line's frames per unit
    assert ds.header["simulator"]["camera"]["pixel_um"] == look["pixel_um"]
    assert {r.format for r in ds.records} == {"vial-2R"}
    # The simulated line, measured again, has the line's look.
    again = look_of_folder(out)
    assert again.format == "vial-2R" and within(again.pixel_um, look["pixel_um"], 0.01)
    assert within(again.backlight_dn, look["backlight_dn"], 0.08)
    assert abs(again.vignetting - look["vignetting"]) < 0.03
    assert abs(again.blur_sigma_px - look["blur_sigma_px"]) < 0.15
    assert within(again.read_noise_dn, look["read_noise_dn"], 0.25)
    # --frames still sets the frames; --overwrite replaces the look with the new one
    assert main(["generate", "--like", str(line), "--out", str(out), "--containers", "2", "--frames", "1",
                 "--workers", "1", "--overwrite"]) == 0
    assert read_manifest(out).header["frames_per_container"] == 1
    assert main(["generate", "--out", str(out), "--containers", "1", "--frames", "1", "--pixel-um", "120",
                 "--workers", "1", "--overwrite"]) == 0
    assert not (out / LOOK_NAME).exists() and "look" not in read_manifest(out).header


def test_cli_generate_like_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(6):
        write_png(blank / f"{i}.png", np.full((200, 120), 210, np.uint8))
    out = tmp_path / "x"
    for args, msg in (
            (["--like", str(tmp_path / "nope")], "no such directory"),
            (["--like", str(tmp_path / "empty")], "no images"),
            (["--like", str(blank)], "only 0 of 6 units showed a container to measure"),
            (["--like", str(blank), "--pixel-um", "50"], "give --like or --pixel-um, not both"),
            (["--like", str(blank), "--optics", "varied"], "give --like or --optics varied, not both"),
            (["--like", str(blank), "--formats", "ampoule"], "unknown format(s) ampoule")):
        assert main(["generate", *args, "--out", str(out), "--containers", "1", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vialinspect: error: ") and msg in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    # A full output folder is refused before the line is measured, not after.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["generate", "--like", str(blank), "--out", str(tmp_path / "full"), "--containers", "1"]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_help_documents_like(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--like DIR" in text and "Not with --pixel-um or --optics varied" in text
