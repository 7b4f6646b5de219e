"""Frame sources: simulator camera, image folder, OpenCV video/live capture with reconnect, Basler emulator."""

from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np
import pytest
import vialinspect.datasets.generate as gen
from vialinspect.datasets.imageio import write_png
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.inspection_station.assembly import Assembler
from vialinspect.inspection_station.sources import SourceError, SourceExhausted, open_source

# 120 µm/px renders a container in ~10 ms, so the simulator tests stay cheap on a busy machine.
SIM = "sim://?rate=0&seed=3&formats=vial-2R&pixel_um=120"


def read_all(src, timeout: float = 5.0, limit: int = 100) -> list:
    frames = []
    while not src.exhausted and len(frames) < limit:
        frames.append(src.read(timeout))
    return frames


def sim_cfg(frames: int) -> SimConfig:
    return SimConfig(formats=("vial-2R",), frames=frames, defect_rate=0.5, camera=CameraConfig(pixel_um=120.0))


def test_sim_frames_ids_and_truth():
    with open_source(SIM + "&count=3", 2) as src:
        frames = read_all(src)
        assert src.exhausted
        with pytest.raises(SourceExhausted):
            src.read(0.1)
        assert [f.container_id for f in frames] == ["c000000", "c000000", "c000001", "c000001", "c000002",
                                                    "c000002"]
        assert [f.index_in_container for f in frames] == [0, 1] * 3
        assert [f.seq for f in frames] == list(range(6))
        assert all(f.error is None and f.pixels.dtype == np.uint8 and f.pixels.ndim == 2 for f in frames)
        assert all(a.timestamp <= b.timestamp for a, b in zip(frames, frames[1:], strict=False))
        truth = src.truth("c000001")
        assert src.truth("nope") is None
    rec, _, _ = gen.make_container(sim_cfg(2), 1, 3)
    assert truth["classes"] == rec.classes and truth["format"] == "vial-2R"
    assert truth["fill_height_mm"] == rec.fill_height_mm
    assert [d["class"] for d in truth["defects"]] == [d.cls for d in rec.defects]


def test_sim_start_resumes_at_index():
    with open_source(SIM + "&count=1&start=5", 2) as src:
        frames = read_all(src)
    assert [f.container_id for f in frames] == ["c000005", "c000005"]
    _, expected, _ = gen.make_container(sim_cfg(2), 5, 3)
    assert all(np.array_equal(f.pixels, e) for f, e in zip(frames, expected, strict=True))


def test_sim_paces_at_line_rate():
    # 600 containers/min with one frame each: ~10 frames/s. Checked loosely, the machine is shared.
    with open_source("sim://?rate=600&seed=0&formats=vial-2R&pixel_um=120", 1) as src:
        t_end = time.monotonic() + 1.0
        frames = []
        while time.monotonic() < t_end and len(frames) < 100:
            frames.append(src.read(1.0))
    good = [f for f in frames if f.error is None]
    assert 5 <= len(good) <= 20


def test_sim_render_stall_loses_the_due_frame(monkeypatch):
    real = gen.make_container

    def slow(cfg, index, seed):
        if index == 0:
            time.sleep(0.5)
        return real(cfg, index, seed)

    monkeypatch.setattr(gen, "make_container", slow)
    with open_source(SIM + "&count=2", 2, first_wait=0) as src:
        first = src.read(0.05)
        rest = read_all(src)
        assert src.stats["underruns"] >= 1
    # Like a camera that missed its trigger: the due frame is reported lost, the stream stays in step.
    assert (first.error, first.container_id, first.index_in_container) == ("camera_timeout", "c000000", 0)
    assert [(f.container_id, f.index_in_container) for f in rest] == [("c000000", 1), ("c000001", 0),
                                                                       ("c000001", 1)]


def test_bad_uris_and_options():
    with pytest.raises(SourceError, match="unknown frame source"):
        open_source("ftp://x", 2)
    with pytest.raises(SourceError, match="unknown option"):
        open_source("sim://?rate=0&colour=blue", 2)
    with pytest.raises(SourceError, match="contradicts"):
        open_source("sim://?frames=3", 2)


@pytest.fixture
def image_folder(tmp_path):
    """Two simulator containers of two frames, named like a generated dataset."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        rec, frames, _ = gen.make_container(sim_cfg(2), i, 0)
        for k, img in enumerate(frames):
            write_png(folder / f"{rec.id}_f{k}.png", img)
    return folder


def test_folder_replays_groups_and_reports_corrupt(image_folder):
    bad = image_folder / "c000001_f0.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    with open_source(f"folder:{image_folder}", 2) as src:
        frames = read_all(src)
        assert src.exhausted
    assert [(f.container_id, f.index_in_container) for f in frames] == [("c000000", 0), ("c000000", 1),
                                                                         ("c000001", 0), ("c000001", 1)]
    assert [f.error for f in frames] == [None, None, "corrupt_frame", None]
    assert frames[2].pixels is None
    a = Assembler(2, window_s=5.0)
    done = [c for f in frames for c in a.push(f)]
    assert [(c.id, c.problems) for c in done] == [("c000000", []), ("c000001", ["corrupt_frame"])]


def test_folder_loop_keeps_ids_unique_and_converts_to_gray(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "a0.png"), np.full((8, 6, 3), (10, 200, 30), np.uint8))  # colour
    cv2.imwrite(str(folder / "a1.png"), np.full((8, 6), 40000, np.uint16))  # 16-bit
    with open_source(f"folder:{folder}?loop=1", 1) as src:
        frames = [src.read(1.0) for _ in range(4)]
        assert not src.exhausted
    assert [f.container_id for f in frames] == ["a0", "a1", "a0~1", "a1~1"]
    assert frames[0].pixels.shape == (8, 6) and frames[0].pixels.dtype == np.uint8
    assert frames[1].pixels.dtype == np.uint16


def test_video_file_source(tmp_path):
    path = tmp_path / "line.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert w.isOpened()
    for i in range(6):
        w.write(np.full((48, 64, 3), 30 * i, np.uint8))
    w.release()
    for uri in (str(path), f"file:{path}"):
        with open_source(uri, 3) as src:
            frames = read_all(src)
        assert len(frames) == 6
        assert all(f.pixels.shape == (48, 64) and f.pixels.dtype == np.uint8 for f in frames)
        assert [f.container_id for f in frames] == ["line-000000"] * 3 + ["line-000001"] * 3
        assert frames[5].pixels.mean() > frames[0].pixels.mean()


class FlakyCapture:
    """A camera that delivers a few frames and then goes away."""

    def __init__(self, frames: int, opened: bool = True) -> None:
        self.left, self.opened = frames, opened

    def isOpened(self) -> bool:  # noqa: N802  (OpenCV's name)
        return self.opened

    def read(self):
        time.sleep(0.005)  # a camera paces itself; without this the reader thread would spin
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.full((4, 5, 3), 100, np.uint8)

    def release(self) -> None:
        self.opened = False


def test_live_capture_disconnect_and_reconnect():
    # First camera: 3 frames then lost; first reconnect fails; second reconnect works.
    caps = iter([FlakyCapture(3), FlakyCapture(0, opened=False), FlakyCapture(1000)])
    lock = threading.Lock()

    def factory():
        with lock:
            return next(caps)

    src = open_source("camera:0", 2, capture_factory=factory, backoff=0.01, max_backoff=0.05)
    try:
        seen = []
        for _ in range(200):
            f = src.read(1.0)
            seen.append("frame" if f.error is None else f.error)
            if f.error is None:
                assert f.pixels.shape == (4, 5)
            if "camera_disconnected" in seen and seen[-2:] == ["frame", "frame"]:
                break
        assert seen[:4] == ["frame", "frame", "frame", "camera_disconnected"]
        assert seen[-2:] == ["frame", "frame"]
        assert src.stats["reconnects"] == 1 and src.stats["reconnect_failures"] >= 1
        assert src.stats["disconnects"] == 1
    finally:
        src.close()


def test_live_capture_that_never_opens_fails_the_start():
    with pytest.raises(SourceError, match="cannot open"):
        open_source("camera:0", 2, capture_factory=lambda: FlakyCapture(0, opened=False))


# ---------------------------------------------------------------------------------------------------------------
# Basler, through pylon's camera emulator


@pytest.fixture
def pylon_emulator(monkeypatch):
    # pylon reads PYLON_CAMEMU when it enumerates devices, so setting it here is enough.
    monkeypatch.setenv("PYLON_CAMEMU", os.environ.get("PYLON_CAMEMU", "1"))
    pylon = pytest.importorskip("pypylon.pylon", reason="pypylon (optional) is not installed")
    try:
        devices = pylon.TlFactory.GetInstance().EnumerateDevices()
    except Exception as e:  # pragma: no cover - depends on the pylon runtime
        pytest.skip(f"pylon runtime unusable here: {e}")
    if not any(d.GetDeviceClass() == "BaslerCamEmu" for d in devices):
        pytest.skip("pylon camera emulator not available (PYLON_CAMEMU had no effect)")
    return pylon


def test_basler_emulator_replays_simulator_images(pylon_emulator, image_folder):
    files = sorted(image_folder.glob("*.png"))
    originals = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in files]
    src = open_source(f"basler://?image_folder={image_folder}", 2, backoff=0.01)
    try:
        frames = [src.read(2.0) for _ in range(4)]
        assert all(f.error is None for f in frames), [f.error for f in frames]
        for f in frames:
            assert f.pixels.shape == originals[0].shape and f.pixels.dtype == np.uint8
            assert any(np.array_equal(f.pixels, o) for o in originals)
        # The camera goes away mid-stream: reported, then reconnected on later reads without a restart.
        real = src._grab

        def broken(timeout_ms):
            src._grab = real
            raise RuntimeError("device removed")

        src._grab = broken
        assert src.read(2.0).error == "camera_disconnected"
        after = [src.read(2.0) for _ in range(20)]
        good = [f for f in after if f.error is None]
        assert good and src.stats["reconnects"] == 1
        assert {f.error for f in after} <= {None, "camera_disconnected"}
        assert good[0].pixels.shape == originals[0].shape
    finally:
        src.close()


def test_basler_unknown_serial(pylon_emulator):
    with pytest.raises(SourceError, match="no camera with serial"):
        open_source("basler://does-not-exist", 2)
