"""Assembly of frames into containers: every not-inspected cause it owns, on a hand-driven clock."""

from __future__ import annotations

import numpy as np
import pytest
from vialinspect.inspection_station.assembly import Assembler
from vialinspect.inspection_station.types import Frame


def px(h: int = 6, w: int = 4, dtype: type = np.uint8) -> np.ndarray:
    return np.zeros((h, w), dtype)


def frame(t: float, cid: str | None = None, idx: int | None = None, pixels: np.ndarray | None = None,
          error: str | None = None, seq: int = 0) -> Frame:
    if pixels is None and error is None:
        pixels = px()
    return Frame(pixels=pixels, timestamp=t, seq=seq, source="test", container_id=cid, index_in_container=idx,
                 error=error)


def test_clean_container_by_id_in_any_order():
    a = Assembler(3, window_s=1.0, expected_size=(4, 6), expected_dtype=np.uint8)
    assert a.push(frame(0.0, "u1", 2, seq=0)) == []
    assert a.push(frame(0.1, "u1", 0, seq=1)) == []
    (c,) = a.push(frame(0.2, "u1", 1, seq=2))
    assert c.id == "u1" and c.problems == [] and c.sequence == 0 and c.trigger_time == 0.0
    assert [f.index_in_container for f in c.frames] == [0, 1, 2]
    assert a.open_count == 0 and a.flush(100.0) == []


def test_clean_containers_by_sequence():
    a = Assembler(2, window_s=1.0)
    out = [c for i in range(4) for c in a.push(frame(0.1 * i, seq=i))]
    assert [c.id for c in out] == ["seq000000", "seq000001"]
    assert all(not c.problems and len(c.frames) == 2 for c in out)
    assert [f.seq for f in out[1].frames] == [2, 3]


def test_missing_frame_closes_on_window():
    a = Assembler(3, window_s=0.5)
    a.push(frame(10.0, "u1", 0))
    a.push(frame(10.1, "u1", 1))
    assert a.flush(10.5) == []  # exactly at the window edge is still on time
    (c,) = a.flush(10.51)
    assert c.problems == ["missing_frame"] and len(c.frames) == 2


def test_missing_frame_by_sequence_when_the_stream_pauses():
    a = Assembler(3, window_s=0.5)
    a.push(frame(0.0))
    a.push(frame(0.1))
    (c,) = a.push(frame(5.0))  # the next frame comes long after: the short group is closed, a new one starts
    assert c.problems == ["missing_frame"] and a.open_count == 1


def test_late_frame_after_close_is_dropped_and_counted():
    a = Assembler(2, window_s=0.5)
    a.push(frame(0.0, "u1", 0))
    (c,) = a.flush(1.0)
    assert c.problems == ["missing_frame"]
    assert a.push(frame(1.2, "u1", 1)) == []  # the unit stays rejected; nothing is reopened
    assert a.stats["late_frames"] == 1 and a.open_count == 0


def test_late_frame_before_flush_closes_the_container():
    a = Assembler(2, window_s=0.5)
    a.push(frame(0.0, "u1", 0))
    (c,) = a.push(frame(0.8, "u1", 1))
    assert c.problems == ["late_frame"] and len(c.frames) == 1


def test_wrong_size_against_recipe_and_first_frame():
    a = Assembler(2, window_s=1.0, expected_size=(4, 6))
    a.push(frame(0.0, "u1", 0, pixels=px(6, 5)))  # width 5, recipe says 4
    (c,) = a.push(frame(0.1, "u1", 1, pixels=px(6, 5)))
    assert c.problems == ["wrong_size"]
    b = Assembler(2, window_s=1.0)  # no recipe size: frames of one unit must still agree
    b.push(frame(0.0, "u2", 0, pixels=px(6, 4)))
    (c,) = b.push(frame(0.1, "u2", 1, pixels=px(7, 4)))
    assert c.problems == ["wrong_size"]


def test_wrong_bit_depth_16_vs_8_bit():
    a = Assembler(2, window_s=1.0)
    a.push(frame(0.0, "u1", 0, pixels=px(dtype=np.uint8)))
    (c,) = a.push(frame(0.1, "u1", 1, pixels=px(dtype=np.uint16)))
    assert c.problems == ["wrong_size"]
    b = Assembler(1, window_s=1.0, expected_dtype="uint8")
    (c,) = b.push(frame(0.0, "u2", 0, pixels=px(dtype=np.uint16)))
    assert c.problems == ["wrong_size"]
    (c,) = b.push(frame(0.1, "u3", 0, pixels=px(dtype=np.uint8)))
    assert c.problems == []


def test_corrupt_frames_empty_array_no_pixels_and_source_error():
    a = Assembler(1, window_s=1.0)
    (c,) = a.push(frame(0.0, "u1", 0, pixels=np.zeros((0, 0), np.uint8)))
    assert c.problems == ["corrupt_frame"]
    (c,) = a.push(Frame(pixels=None, timestamp=0.1, seq=1, source="t", container_id="u2", index_in_container=0))
    assert c.problems == ["corrupt_frame"]
    (c,) = a.push(frame(0.2, "u3", 0, error="corrupt_frame"))
    assert c.problems == ["corrupt_frame"]
    (c,) = a.push(frame(0.3, "u4", 0, error="something odd"))  # unknown errors still reject
    assert c.problems == ["corrupt_frame"]


def test_camera_error_with_container_id_fills_its_slot():
    a = Assembler(2, window_s=1.0)
    a.push(frame(0.0, "u1", 0))
    (c,) = a.push(frame(0.1, "u1", 1, error="camera_timeout"))
    assert c.problems == ["camera_timeout"] and len(c.frames) == 2 and c.frames[1].pixels is None


def test_unplaced_camera_error_hits_open_and_next_containers():
    a = Assembler(2, window_s=1.0)
    a.push(frame(0.0))
    assert a.push(frame(0.1, error="camera_disconnected")) == []  # takes no slot
    (c1,) = a.push(frame(0.2))
    assert c1.problems == ["camera_disconnected"] and len(c1.frames) == 2
    a.push(frame(0.3))  # opens within the window of the failure: it may have lost its first frame
    (c2,) = a.push(frame(0.4))
    assert c2.problems == ["camera_disconnected"]
    # Long after the failure, units are clean again.
    a.push(frame(5.0))
    (c3,) = a.push(frame(5.1))
    assert c3.problems == []


def test_duplicate_slot_is_dropped_and_unit_ends_missing():
    a = Assembler(2, window_s=0.5)
    a.push(frame(0.0, "u1", 0))
    assert a.push(frame(0.1, "u1", 0)) == []
    assert a.stats["bad_slot_frames"] == 1
    (c,) = a.flush(1.0)
    assert c.problems == ["missing_frame"]


def test_drain_on_shutdown_and_bad_arguments():
    a = Assembler(3, window_s=1.0, start_sequence=41)
    a.push(frame(0.0, "u1", 0))
    (c,) = a.drain()
    assert c.problems == ["shutdown"] and c.sequence == 41
    with pytest.raises(ValueError):
        a.drain("bogus")
    with pytest.raises(ValueError):
        Assembler(0, window_s=1.0)
