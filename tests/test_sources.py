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
    with pytest.raises(SourceError, match="backlight must be from 0.05 to 1.2"):
        open_source("sim://?backlight=3", 2)


def test_sim_backlight_dims_the_frames_of_the_same_units():
    with open_source(SIM + "&count=1", 2) as src:
        nominal = read_all(src)
    with open_source(SIM + "&count=1&backlight=0.7", 2) as src:
        dim = read_all(src)
    ratio = float(np.median(dim[0].pixels)) / float(np.median(nominal[0].pixels))
    assert 0.6 < ratio < 0.8


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


def test_folder_replays_groups_and_reports_bad_image(image_folder):
    bad = image_folder / "c000001_f0.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    with open_source(f"folder:{image_folder}", 2) as src:
        frames = read_all(src)
        assert src.exhausted
    assert [(f.container_id, f.index_in_container) for f in frames] == [("c000000", 0), ("c000000", 1),
                                                                         ("c000001", 0), ("c000001", 1)]
    assert [f.error for f in frames] == [None, None, "bad_image", None]
    assert frames[2].pixels is None
    a = Assembler(2, window_s=5.0)
    done = [c for f in frames for c in a.push(f)]
    assert [(c.id, c.problems) for c in done] == [("c000000", []), ("c000001", ["bad_image"])]


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


def test_folder_passes_over_system_files_that_would_shift_the_units_frames(tmp_path):
    folder = tmp_path / "copied_from_a_mac"
    folder.mkdir()
    for unit in ("u1", "u2"):
        for k in range(2):
            write_png(folder / f"{unit}_f{k}.png", np.full((8, 6), 100 + k, np.uint8))
    (folder / "._u1_f0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a resource fork, named as an image
    (folder / "Thumbs.db").write_bytes(b"x")
    with open_source(f"folder:{folder}", 2) as src:
        frames = read_all(src)
    assert [f.container_id for f in frames] == ["u1", "u1", "u2", "u2"]
    assert [int(f.pixels[0, 0]) for f in frames] == [100, 101, 100, 101]  # each unit's own frames, in order


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


def test_video_file_loop_never_fills_a_short_last_unit_from_the_next_pass(tmp_path):
    path = tmp_path / "short.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(5):
        w.write(np.full((48, 64, 3), 40 * i, np.uint8))
    w.release()
    with open_source(f"file:{path}?loop=1", 3) as src:
        frames = [src.read(1.0) for _ in range(8)]
    ids = [(f.container_id, f.index_in_container) for f in frames]
    assert ids == [("short-000000", 0), ("short-000000", 1), ("short-000000", 2), ("short-000001", 0),
                   ("short-000001", 1), ("short-000002", 0), ("short-000002", 1), ("short-000002", 2)]
    a = Assembler(3, window_s=0.5)
    done = [c for f in frames for c in a.push(f)] + a.flush(time.monotonic() + 1.0)
    assert sorted((c.id, c.problems) for c in done) == [("short-000000", []), ("short-000001", ["missing_frame"]),
                                                        ("short-000002", [])]


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
        assert src.frame_order == "counter" and [f.seq for f in frames] == [0, 1, 2, 3]  # the camera's block ids
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
        # The new grab session starts a unit: its first frame is numbered at the next multiple of K.
        assert good[0].seq == 4 and all(a.seq < b.seq for a, b in zip(good, good[1:], strict=False))
        assert {f.error for f in after} <= {None, "camera_disconnected"}
        assert good[0].pixels.shape == originals[0].shape
    finally:
        src.close()


def test_basler_unknown_serial(pylon_emulator):
    with pytest.raises(SourceError, match="no camera with serial"):
        open_source("basler://does-not-exist", 2)


# ---------------------------------------------------------------------------------------------------------------
# Frame identity of live sources: a dropped frame is a gap in seq, never a shift of every later unit


def units_by_counter(frames, k: int, window_s: float = 30.0):
    a = Assembler(k, window_s=window_s, frame_order="counter")
    out = [c for f in frames for c in a.push(f)]
    return out, a


def wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for the capture thread"
        time.sleep(0.002)


class GatedCapture:
    """A camera that takes a frame whenever the test lets it; pixel value = frame number, to check identity."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.taken = 0
        self.opened = True

    def isOpened(self) -> bool:  # noqa: N802  (OpenCV's name)
        return self.opened

    def read(self):
        while not self.gate.acquire(timeout=0.02):
            if not self.opened:
                return False, None
        n, self.taken = self.taken, self.taken + 1
        return True, np.full((4, 5, 3), n, np.uint8)

    def release(self) -> None:
        self.opened = False


def test_live_capture_overrun_leaves_a_gap_in_seq_and_rejects_only_that_unit(monkeypatch):
    from vialinspect.inspection_station.sources import LiveCaptureSource

    monkeypatch.setattr(LiveCaptureSource, "QUEUE_FRAMES", 4)
    cam = GatedCapture()
    src = open_source("camera:0", 2, capture_factory=lambda: cam)
    try:
        assert src.frame_order == "counter"
        cam.gate.release(2)
        frames = [src.read(2.0) for _ in range(2)]
        cam.gate.release(6)  # the station falls behind: 6 frames taken, room for 4
        wait_for(lambda: src.stats.get("overruns") == 2)
        frames += [src.read(2.0) for _ in range(4)]
        cam.gate.release(2)
        frames += [src.read(2.0) for _ in range(2)]
    finally:
        cam.opened = False
        src.close()
    assert all(f.error is None and f.container_id is None for f in frames)  # no "missing_frame" notice: the gap says it
    assert [f.seq for f in frames] == [0, 1, 4, 5, 6, 7, 8, 9]
    assert all(int(f.pixels[0, 0]) == f.seq for f in frames)
    out, _ = units_by_counter(frames, 2)
    assert [(c.id, c.problems, [f.seq for f in c.frames]) for c in out] == [
        ("seq000000", [], [0, 1]), ("seq000001", ["missing_frame"], []), ("seq000002", [], [4, 5]),
        ("seq000003", [], [6, 7]), ("seq000004", [], [8, 9])]


def test_live_capture_drop_in_mid_unit(monkeypatch):
    from vialinspect.inspection_station.sources import LiveCaptureSource

    monkeypatch.setattr(LiveCaptureSource, "QUEUE_FRAMES", 3)
    cam = GatedCapture()
    src = open_source("camera:0", 3, capture_factory=lambda: cam)
    try:
        cam.gate.release(4)  # 0..3 taken, room for 3: frame 0 goes
        wait_for(lambda: src.stats.get("overruns") == 1)
        frames = [src.read(2.0) for _ in range(3)]
        for n in (3, 2):  # never more than the buffer holds: no more drops
            cam.gate.release(n)
            frames += [src.read(2.0) for _ in range(n)]
    finally:
        cam.opened = False
        src.close()
    assert [f.seq for f in frames] == [1, 2, 3, 4, 5, 6, 7, 8]
    out, _ = units_by_counter(frames, 3)
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [
        (["missing_frame"], [1, 2]), ([], [3, 4, 5]), ([], [6, 7, 8])]


def test_live_capture_reconnect_starts_a_unit():
    from vialinspect.inspection_station.assembly import NO_SEQ

    caps = iter([FlakyCapture(4), FlakyCapture(1000)])
    lock = threading.Lock()

    def factory():
        with lock:
            return next(caps)

    src = open_source("camera:0", 3, capture_factory=factory, backoff=0.01, max_backoff=0.05)
    try:
        frames = []
        while len([f for f in frames if f.error is None]) < 10:
            frames.append(src.read(2.0))
    finally:
        src.close()
    lost = [f for f in frames if f.error is not None]
    assert [f.error for f in lost] == ["camera_disconnected"] and lost[0].seq == NO_SEQ
    good = [f.seq for f in frames if f.error is None]
    assert good == [0, 1, 2, 3] + list(range(6, 12))  # the new stream starts at the next unit boundary
    out, _ = units_by_counter(frames, 3)
    assert [[f.seq for f in c.frames] for c in out] == [[0, 1, 2], [3], [6, 7, 8], [9, 10, 11]]
    assert out[0].problems == [] and "missing_frame" in out[1].problems
    assert set(out[2].problems) <= {"camera_disconnected"} and out[3].problems == []


def test_sources_say_what_their_seq_is_worth(image_folder):
    with open_source(f"folder:{image_folder}", 2) as src:
        assert src.frame_order == "arrival"  # synchronous replay, frames name their container
    with open_source(SIM + "&count=1", 2) as src:
        assert src.frame_order == "arrival"


# Basler, through a stand-in for pypylon: the grab results' block ids and image numbers are the camera's counters.


class FakeResult:
    def __init__(self, block, image, skipped=0, ok=True):
        self.block, self.image, self.skipped, self.ok = block, image, skipped, ok

    def IsValid(self):  # noqa: N802 - pylon's names
        return True

    def GrabSucceeded(self):  # noqa: N802
        return self.ok

    def GetErrorDescription(self):  # noqa: N802
        return "buffer incompletely grabbed"

    def GetArray(self):  # noqa: N802
        return np.full((4, 6), self.image % 256, np.uint8)

    def GetBlockID(self):  # noqa: N802
        return self.block

    def GetImageNumber(self):  # noqa: N802
        return self.image

    def GetNumberOfSkippedImages(self):  # noqa: N802
        return self.skipped

    def Release(self):  # noqa: N802
        pass


class FakeCamera:
    """Delivers its script of grab results; an exception in the script is raised (the camera goes away)."""

    def __init__(self, script):
        self.script = list(script)

    def Open(self):  # noqa: N802
        pass

    def Close(self):  # noqa: N802
        pass

    def StartGrabbing(self, strategy):  # noqa: N802
        pass

    def StopGrabbing(self):  # noqa: N802
        pass

    def IsCameraDeviceRemoved(self):  # noqa: N802
        return False

    def RetrieveResult(self, timeout_ms, handling):  # noqa: N802
        if not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def fake_pylon(monkeypatch, *cameras):
    from types import SimpleNamespace

    import vialinspect.inspection_station.sources as sources_mod

    cams = iter(cameras)
    info = SimpleNamespace(GetSerialNumber=lambda: "123", GetUserDefinedName=lambda: "")
    tl = SimpleNamespace(EnumerateDevices=lambda: [info], CreateDevice=lambda i: i)
    pylon = SimpleNamespace(TlFactory=SimpleNamespace(GetInstance=lambda: tl), InstantCamera=lambda dev: next(cams),
                            GrabStrategy_OneByOne=1, TimeoutHandling_Return=2)
    monkeypatch.setattr(sources_mod, "_import_pylon", lambda: pylon)


def basler_frames(monkeypatch, k, *scripts, reads=None):
    fake_pylon(monkeypatch, *[FakeCamera(s) for s in scripts])
    src = open_source("basler://", k, backoff=0.0, max_backoff=0.0)
    try:
        n = reads if reads is not None else sum(len(s) for s in scripts) + len(scripts) - 1
        return [src.read(0.01) for _ in range(n)], src
    finally:
        src.close()


def test_basler_block_id_gap_rejects_only_the_unit_that_lost_a_frame(monkeypatch):
    script = [FakeResult(b, b + 1) for b in (0, 1, 2, 4, 5, 6, 7)]  # block 3 never reached the host
    frames, src = basler_frames(monkeypatch, 2, script)
    assert src.frame_order == "counter"
    assert [f.seq for f in frames] == [0, 1, 2, 4, 5, 6, 7]
    out, _ = units_by_counter(frames, 2)
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [
        ([], [0, 1]), (["missing_frame"], [2]), ([], [4, 5]), ([], [6, 7])]


def test_basler_gige_block_id_wraps_and_first_frame_sets_the_count(monkeypatch):
    # 16-bit GigE block ids: ..., 65535, then 1 (0 is skipped). The session's first frame is seq 0.
    blocks = [65532, 65533, 65534, 65535, 1, 2, 4, 5]  # block 3 lost
    frames, _ = basler_frames(monkeypatch, 4, [FakeResult(b, i + 1) for i, b in enumerate(blocks)])
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4, 5, 7, 8]
    out, _ = units_by_counter(frames, 4)
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [([], [0, 1, 2, 3]),
                                                                      (["missing_frame"], [4, 5, 7])]


def test_basler_without_block_ids_counts_image_numbers_and_skipped_images(monkeypatch):
    script = [FakeResult(0, 1), FakeResult(0, 2), FakeResult(0, 3), FakeResult(0, 4, skipped=2), FakeResult(0, 5),
              FakeResult(2**64 - 1, 6), FakeResult(0, 7)]
    frames, _ = basler_frames(monkeypatch, 3, script)
    assert [f.seq for f in frames] == [0, 1, 2, 5, 6, 7, 8]
    out, _ = units_by_counter(frames, 3)
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [
        ([], [0, 1, 2]), (["missing_frame"], [5]), ([], [6, 7, 8])]


def test_basler_failed_grab_keeps_its_number_and_reconnect_starts_a_unit(monkeypatch):
    from vialinspect.inspection_station.assembly import NO_SEQ

    first = [FakeResult(0, 1), FakeResult(1, 2, ok=False), FakeResult(2, 3), FakeResult(3, 4),
             RuntimeError("device removed")]
    second = [FakeResult(0, 1), FakeResult(1, 2), FakeResult(2, 3)]  # the new session counts from 0 again
    frames, src = basler_frames(monkeypatch, 3, first, second, reads=8)
    assert [(f.seq, f.error) for f in frames] == [(0, None), (1, "corrupt_frame"), (2, None), (3, None),
                                                  (NO_SEQ, "camera_disconnected"), (6, None), (7, None), (8, None)]
    assert src.stats["reconnects"] == 1
    out, _ = units_by_counter(frames, 3)
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [
        (["corrupt_frame"], [0, 1, 2]), (["camera_disconnected", "missing_frame"], [3]),
        (["camera_disconnected"], [6, 7, 8])]


def test_basler_repeated_block_id_is_not_merged(monkeypatch):
    script = [FakeResult(b, i + 1) for i, b in enumerate([0, 1, 1, 2, 3])]
    frames, _ = basler_frames(monkeypatch, 2, script)
    assert [f.seq for f in frames] == [0, 1, 1, 2, 3]
    out, a = units_by_counter(frames, 2)
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [([], [0, 1]), ([], [2, 3])]
    assert a.stats["seq_faults"] == 1


# The station wiring: the pipeline groups by what the source declares.


def _pipeline_run(src, tmp_path, frames: int, frame_size=None):
    from vialinspect.inspection_station.line import MemoryLineOutput
    from vialinspect.inspection_station.pipeline import ModelSlot, Pipeline
    from vialinspect.inspection_station.recipe import Recipe
    from vialinspect.inspection_station.store import RecordStore

    recipe = Recipe.from_dict(dict(name="t", format="vial-2R", model="unused", frames=frames, deadline_ms=400,
                                   frame_size=list(frame_size) if frame_size else None, batch_max=4,
                                   sample_accepted=0.0, min_free_mb=0.0))
    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    line = MemoryLineOutput()
    pipe = Pipeline(src, recipe, ModelSlot(None), store, line, window_s=30.0, read_timeout_s=0.05)
    pipe.start()
    assert pipe.join(timeout=30)
    store.close()
    assert not pipe.errors and pipe.alarm is None
    return line.sent


def test_pipeline_groups_a_counting_source_by_its_counter(tmp_path):
    from vialinspect.inspection_station.sources import Source

    class Counting(Source):
        frame_order = "counter"

        def __init__(self, seqs):
            super().__init__("counting://", 2)
            self.seqs = list(seqs)

        @property
        def exhausted(self):
            return not self.seqs

        def _read(self, timeout):
            s = self.seqs.pop(0)
            return self._frame(np.full((8, 6), s, np.uint8), seq=s)

    sent = _pipeline_run(Counting([0, 1, 2, 4, 5, 6, 7]), tmp_path, 2)
    assert [(d.container_id, d.sequence, d.reasons) for d in sent] == [
        ("seq000000", 0, ["not_inspected:no_model"]), ("seq000001", 1, ["not_inspected:missing_frame"]),
        ("seq000002", 2, ["not_inspected:no_model"]), ("seq000003", 3, ["not_inspected:no_model"])]


# ---------------------------------------------------------------------------------------------------------------
# Image files of unknown origin: bounded reads


def huge_png_header(w: int = 40000, h: int = 40000) -> bytes:
    """A small, well-formed PNG that claims w x h pixels (decoding it would need w*h bytes)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


@pytest.fixture
def folder_with_bad_files(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = np.full((24, 16), 77, np.uint8)
    write_png(folder / "a0.png", good)
    (folder / "a1.png").write_bytes(huge_png_header())
    ok = folder / "a0.png"
    (folder / "a2.png").write_bytes(ok.read_bytes()[: len(ok.read_bytes()) // 2])  # truncated
    (folder / "a3.png").write_text("not an image at all\n")
    cv2.imwrite(str(folder / "a4.jpg"), np.full((24, 16), 50, np.uint8))
    (folder / "a5.tif").write_bytes(b"II*\x00" + b"\xff" * 12)  # a TIFF header going nowhere
    (folder / "notes.txt").write_text("not a frame")  # not an image suffix: not part of the replay
    return folder


def test_folder_bad_files_are_bad_image_units_and_the_source_goes_on(folder_with_bad_files):
    with open_source(f"folder:{folder_with_bad_files}", 1, frame_size=(16, 24)) as src:
        assert src.max_pixels == 4 * 16 * 24
        frames = read_all(src)
    assert [f.container_id for f in frames] == ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert [f.error for f in frames] == [None, "bad_image", "bad_image", "bad_image", None, "bad_image"]
    assert int(frames[0].pixels[0, 0]) == 77 and frames[4].pixels.shape == (24, 16)
    a = Assembler(1, window_s=5.0, expected_size=(16, 24))
    done = [c for f in frames for c in a.push(f)]
    assert [(c.id, c.problems) for c in done] == [("a0", []), ("a1", ["bad_image"]), ("a2", ["bad_image"]),
                                                  ("a3", ["bad_image"]), ("a4", []), ("a5", ["bad_image"])]


def test_folder_frames_over_the_recipe_bound_are_refused_without_a_recipe_by_the_hard_cap(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    write_png(folder / "b0.png", np.zeros((40, 40), np.uint8))  # 1600 px: 6.25x a 16x16 recipe frame
    (folder / "b1.png").write_bytes(huge_png_header())
    with open_source(f"folder:{folder}", 1, frame_size=(16, 16)) as src:
        assert [f.error for f in read_all(src)] == ["bad_image", "bad_image"]
    with open_source(f"folder:{folder}", 1) as src:  # no recipe size: only the hard cap
        assert [f.error for f in read_all(src)] == [None, "bad_image"]
    with open_source(f"folder:{folder}?max_pixels=100000", 1) as src:
        assert src.max_pixels == 100000


def test_station_pipeline_rejects_exactly_the_bad_files(folder_with_bad_files, tmp_path):
    src = open_source(f"folder:{folder_with_bad_files}", 1, frame_size=(16, 24))
    try:
        sent = _pipeline_run(src, tmp_path, 1, frame_size=(16, 24))
    finally:
        src.close()
    assert {d.container_id: d.reasons for d in sent} == {
        "a0": ["not_inspected:no_model"], "a1": ["not_inspected:bad_image"], "a2": ["not_inspected:bad_image"],
        "a3": ["not_inspected:bad_image"], "a4": ["not_inspected:no_model"], "a5": ["not_inspected:bad_image"]}


def test_image_size_reads_headers_of_every_supported_format(tmp_path):
    from vialinspect.datasets.imageio import ImageError, image_size, read_gray_bounded

    img = np.random.default_rng(0).integers(0, 255, (13, 21), dtype=np.uint8)
    for suffix in (".png", ".jpg", ".bmp", ".tif"):
        p = tmp_path / f"x{suffix}"
        assert cv2.imwrite(str(p), img)
        assert image_size(p.read_bytes()) == (21, 13), suffix
        assert read_gray_bounded(p, 21 * 13).shape == (13, 21)
        with pytest.raises(ImageError, match="larger than"):
            read_gray_bounded(p, 21 * 13 - 1)
    assert image_size(huge_png_header(40000, 30000)) == (40000, 30000)
    assert image_size(b"GIF89a") is None and image_size(b"\x89PNG\r\n\x1a\n") is None
    with pytest.raises(ImageError, match="not found"):
        read_gray_bounded(tmp_path / "nope.png")
