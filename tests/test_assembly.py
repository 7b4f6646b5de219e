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


# ---------------------------------------------------------------------------------------------------------------
# Frames without container ids, placed by their identity: the camera's counter ("counter") or their timestamp
# against the frame period ("timestamp"). Every frame carries its seq in its pixels too, so a unit's content is
# checked, not only its bookkeeping.


def counted(seqs, period: float = 0.01, t0: float = 0.0) -> list[Frame]:
    return [Frame(pixels=np.full((6, 4), s, np.uint16), timestamp=t0 + period * s, seq=s, source="cam")
            for s in seqs]


def run(a: Assembler, frames) -> list:
    return [c for f in frames for c in a.push(f)]


def seqs_of(c) -> list[int]:
    assert all(f.pixels is None or int(f.pixels[0, 0]) == f.seq for f in c.frames)  # pixels match identity
    return [f.seq for f in c.frames]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_counter_a_drop_at_any_position_rejects_only_its_unit(k):
    units = 4
    for drop_unit in range(units):
        for pos in range(k):
            lost = drop_unit * k + pos
            if k == 1 and drop_unit == units - 1:
                continue  # a whole unit lost at the very end: no later frame tells (until one comes)
            a = Assembler(k, window_s=1.0, frame_order="counter")
            out = run(a, counted(s for s in range(units * k) if s != lost))
            out += a.flush(100.0)  # a drop in the last unit: its window runs out
            assert [c.id for c in out] == [f"seq{n:06d}" for n in range(units)], (k, lost)
            assert [c.sequence for c in out] == list(range(units))
            for n, c in enumerate(out):
                own = [s for s in range(n * k, (n + 1) * k) if s != lost]
                assert seqs_of(c) == own, (k, lost, n)
                assert c.problems == (["missing_frame"] if n == drop_unit else []), (k, lost, n)
            assert a.open_count == 0


def test_counter_unit_short_of_a_frame_is_closed_by_the_next_units_first_frame():
    a = Assembler(3, window_s=1.0, frame_order="counter")
    assert run(a, counted([0, 1, 2, 3, 4])) and a.open_count == 1  # unit 0 done, unit 1 open; frame 5 is lost
    (c,) = a.push(counted([6])[0])
    assert c.id == "seq000001" and c.problems == ["missing_frame"] and seqs_of(c) == [3, 4]


def test_counter_two_drops_in_one_unit():
    a = Assembler(4, window_s=1.0, frame_order="counter")
    out = run(a, counted([0, 1, 2, 3, 5, 7, 8, 9, 10, 11]))
    assert [(c.id, c.problems, seqs_of(c)) for c in out] == [
        ("seq000000", [], [0, 1, 2, 3]), ("seq000001", ["missing_frame"], [5, 7]), ("seq000002", [], [8, 9, 10, 11])]


@pytest.mark.parametrize("lost_units", [[1], [1, 2], [0], [0, 1, 2]])
def test_counter_a_whole_unit_lost_is_still_a_unit_rejected(lost_units):
    k, units = 3, 5
    a = Assembler(k, window_s=1.0, frame_order="counter", start_sequence=100)
    out = run(a, counted(s for s in range(units * k) if s // k not in lost_units))
    assert [c.id for c in out] == [f"seq{100 + n:06d}" for n in range(units)]
    assert [c.sequence for c in out] == [100 + n for n in range(units)]
    for n, c in enumerate(out):
        if n in lost_units:
            assert c.frames == [] and c.problems == ["missing_frame"]
        else:
            assert seqs_of(c) == list(range(n * k, (n + 1) * k)) and c.problems == []


def test_counter_drops_spanning_units():
    # The last frame of unit 1, all of unit 2 and the first of unit 3 are lost.
    a = Assembler(2, window_s=1.0, frame_order="counter")
    out = run(a, counted([0, 1, 2, 7, 8, 9]))
    assert [(c.id, c.problems, seqs_of(c)) for c in out] == [
        ("seq000000", [], [0, 1]), ("seq000001", ["missing_frame"], [2]), ("seq000002", ["missing_frame"], []),
        ("seq000003", ["missing_frame"], [7]), ("seq000004", [], [8, 9])]


def test_counter_repeated_or_backward_frame_is_never_merged():
    a = Assembler(4, window_s=1.0, frame_order="counter")
    dup = counted([1])[0]
    dup.pixels = np.full((6, 4), 99, np.uint16)  # same seq, other content
    out = run(a, counted([0, 1]) + [dup] + counted([2, 3, 4, 6, 5, 7, 8, 9, 10, 11]))
    assert [(c.id, c.problems) for c in out] == [("seq000000", ["missing_frame"]), ("seq000001", ["missing_frame"]),
                                                 ("seq000002", [])]
    assert seqs_of(out[0]) == [0, 1, 2, 3] and int(out[0].frames[1].pixels[0, 0]) == 1  # the first copy, alone
    assert seqs_of(out[1]) == [4, 6, 7]  # 5 came after 6: dropped
    assert seqs_of(out[2]) == [8, 9, 10, 11]
    assert a.stats["seq_faults"] == 2
    # A repeat between units touches no unit being assembled; it is still dropped and counted.
    b = Assembler(2, window_s=1.0, frame_order="counter")
    out = run(b, counted([0, 1, 1, 2, 3]))
    assert [(c.problems, seqs_of(c)) for c in out] == [([], [0, 1]), ([], [2, 3])] and b.stats["seq_faults"] == 1


def test_counter_restart_realigns_on_the_first_frame_after_it():
    a = Assembler(3, window_s=1.0, frame_order="counter")
    out = run(a, counted([0, 1, 2, 3, 4]))  # unit 1 open with 3, 4
    out += run(a, counted([0, 1, 2, 3, 4, 5], t0=0.1))  # the camera restarted its counter
    assert [(c.id, c.problems, seqs_of(c)) for c in out] == [
        ("seq000000", [], [0, 1, 2]), ("seq000001", ["missing_frame"], [3, 4]), ("seq000002", [], [0, 1, 2]),
        ("seq000003", [], [3, 4, 5])]
    assert a.stats["seq_restarts"] == 1


def test_counter_leap_far_ahead_is_a_restart_not_a_million_units():
    a = Assembler(2, window_s=1.0, frame_order="counter", max_gap_units=10)
    out = run(a, counted([0, 1, 2]))
    out += run(a, [Frame(pixels=np.full((6, 4), 7, np.uint16), timestamp=1.0, seq=10**9 + s, source="cam")
                   for s in range(2)])
    assert [(c.id, c.problems, len(c.frames)) for c in out] == [
        ("seq000000", [], 2), ("seq000001", ["missing_frame"], 1), ("seq000002", [], 2)]
    assert a.stats["seq_restarts"] == 1
    # Within the bound, a long loss is that many rejected units.
    b = Assembler(2, window_s=1.0, frame_order="counter", max_gap_units=10)
    out = run(b, counted([0, 1, 22, 23]))
    assert len(out) == 12 and all(c.problems == ["missing_frame"] and not c.frames for c in out[1:11])


def test_counter_frame_after_its_unit_timed_out_is_dropped_and_later_units_stay_aligned():
    a = Assembler(2, window_s=0.5, frame_order="counter")
    a.push(counted([0])[0])
    (c,) = a.flush(1.0)
    assert c.id == "seq000000" and c.problems == ["missing_frame"]
    assert a.push(Frame(pixels=np.full((6, 4), 1, np.uint16), timestamp=1.1, seq=1, source="cam")) == []
    assert a.stats["late_frames"] == 1 and a.open_count == 0
    out = run(a, counted([2, 3], t0=1.2))
    assert [(c.id, c.problems, seqs_of(c)) for c in out] == [("seq000001", [], [2, 3])]
    # A frame that comes after its open unit's window, before flush() ran, closes that unit as late.
    b = Assembler(2, window_s=0.5, frame_order="counter")
    b.push(counted([0])[0])
    (c,) = b.push(Frame(pixels=np.full((6, 4), 1, np.uint16), timestamp=0.9, seq=1, source="cam"))
    assert c.problems == ["late_frame"] and seqs_of(c) == [0]


def test_counter_failure_frames_with_and_without_a_number():
    from vialinspect.inspection_station.assembly import NO_SEQ

    a = Assembler(2, window_s=1.0, frame_order="counter")
    failed = Frame(pixels=None, timestamp=0.01, seq=1, source="cam", error="corrupt_frame")  # a failed grab
    out = run(a, counted([0]) + [failed] + counted([2, 3]))
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [(["corrupt_frame"], [0, 1]), ([], [2, 3])]
    # A time-out is no particular frame: it goes to the open unit (and the next one within the window).
    b = Assembler(2, window_s=1.0, frame_order="counter")
    timeout = Frame(pixels=None, timestamp=0.015, seq=NO_SEQ, source="cam", error="camera_timeout")
    out = run(b, counted([0]) + [timeout] + counted([1, 2, 3]) + counted([4, 5], t0=5.0))
    assert [(c.problems, seqs_of(c)) for c in out] == [(["camera_timeout"], [0, 1]), (["camera_timeout"], [2, 3]),
                                                       ([], [4, 5])]
    # A frame with pixels but no number cannot be placed either.
    c = Assembler(2, window_s=1.0, frame_order="counter")
    stray = Frame(pixels=np.zeros((6, 4), np.uint16), timestamp=0.0, seq=NO_SEQ, source="cam")
    out = run(c, counted([0]) + [stray] + counted([1]))
    assert [(x.problems, seqs_of(x)) for x in out] == [(["missing_frame"], [0, 1])]


def test_timestamp_order_places_frames_by_frame_period():
    period = 0.1
    jitter = [0.0, 0.02, -0.02, 0.01, -0.01, 0.02, -0.02, 0.0, 0.01, -0.02, 0.02, 0.0]  # adjacent: < period / 2
    for lost in range(1, len(jitter)):  # (the first frame anchors the stream: nothing tells it was not the first)
        a = Assembler(3, window_s=1.0, frame_order="timestamp", frame_period_s=period)
        frames = [Frame(pixels=np.full((6, 4), i, np.uint16), timestamp=10.0 + i * period + j, seq=n, source="c")
                  for n, (i, j) in enumerate((i, j) for i, j in enumerate(jitter) if i != lost)]
        out = run(a, frames)
        if lost >= 9:
            out += a.flush(100.0)
        assert len(out) == 4, lost
        for n, c in enumerate(out):
            own = [i for i in range(3 * n, 3 * n + 3) if i != lost]
            assert [int(f.pixels[0, 0]) for f in c.frames] == own
            assert c.problems == (["missing_frame"] if n == lost // 3 else []), (lost, n)


def test_timestamp_order_double_frame_and_lost_camera():
    a = Assembler(2, window_s=1.0, frame_order="timestamp", frame_period_s=0.1)
    ts = [0.0, 0.1, 0.2, 0.22, 0.3]  # 0.22: a second frame in one period's slot
    out = run(a, [Frame(pixels=np.zeros((6, 4), np.uint8), timestamp=t, seq=i, source="c") for i, t in enumerate(ts)])
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [([], [0, 1]), (["missing_frame"], [2, 4])]
    assert a.stats["seq_faults"] == 1
    # After a lost camera the next frame starts a unit, however long the outage was.
    b = Assembler(2, window_s=1.0, frame_order="timestamp", frame_period_s=0.1)
    frames = [Frame(pixels=np.zeros((6, 4), np.uint8), timestamp=t, seq=i, source="c")
              for i, t in enumerate([0.0, 0.1, 0.2])]
    out = run(b, frames)
    b.push(Frame(pixels=None, timestamp=0.25, seq=3, source="c", error="camera_disconnected"))
    out += run(b, [Frame(pixels=np.zeros((6, 4), np.uint8), timestamp=t, seq=4 + i, source="c")
                   for i, t in enumerate([0.37, 0.47, 0.57])])
    assert [(c.problems, [f.seq for f in c.frames]) for c in out] == [
        ([], [0, 1]), (["camera_disconnected", "missing_frame"], [2]), (["camera_disconnected"], [4, 5])]
    assert b.open_count == 1


def test_arrival_order_after_a_loss_every_unit_is_in_doubt_until_the_stream_pauses():
    a = Assembler(2, window_s=0.5)
    out = run(a, [frame(0.0, seq=0), frame(0.1, seq=1), frame(0.2, seq=2)])
    a.push(frame(0.25, error="missing_frame", seq=3))  # e.g. a buffer overrun reported by an arrival-order source
    out += run(a, [frame(0.1 * i, seq=i) for i in range(3, 12)])  # no pause: K consecutive frames mean nothing now
    out += run(a, [frame(5.0, seq=20), frame(5.1, seq=21)])  # after a pause, units start afresh
    assert [c.problems for c in out[:1]] == [[]]
    assert all(c.problems == ["missing_frame"] for c in out[1:-1])
    assert out[-1].problems == []


def test_frame_order_arguments_are_checked():
    with pytest.raises(ValueError, match="frame order"):
        Assembler(2, window_s=1.0, frame_order="guess")
    with pytest.raises(ValueError, match="period"):
        Assembler(2, window_s=1.0, frame_order="timestamp")


def test_a_used_container_id_is_assembled_again_never_dropped_unseen():
    a = Assembler(2, window_s=0.5)
    assert len(a.push(frame(0.0, "u1", 0)) + a.push(frame(0.0, "u1", 1))) == 1
    a.push(frame(5.0, "u1", 0))  # the same id on another physical unit
    (again,) = a.push(frame(5.0, "u1", 1))
    assert again.id == "u1" and again.problems == [] and a.stats["reused_ids"] == 1  # the store rejects it
    a.push(frame(6.0, "u2", 0))
    (short,) = a.flush(7.0)
    assert short.problems == ["missing_frame"]
    (reused,) = a.push(frame(8.0, "u2", 0)) or a.flush(9.0)  # a slot u2 already had: a new unit, not late
    assert reused.id == "u2" and a.stats["reused_ids"] == 2
