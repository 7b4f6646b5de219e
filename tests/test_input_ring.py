"""The input ring: slot ownership, preprocessing into a slot, and batches read from the ring without a copy."""

import numpy as np
import pytest

from vision.input_ring import InputRing
from vision.preprocess import InputSpec, input_shape, preprocess
from vision.runtime import adjacent_view, model_runs

SHAPE = (2, 3, 4)


def test_takes_are_consecutive_slots_and_a_slot_is_not_handed_out_twice():
    ring = InputRing(3)
    a, b, c = (ring.take(SHAPE) for _ in range(3))
    assert [x.index for x in (a, b, c)] == [0, 1, 2]
    assert ring.take(SHAPE) is None and ring.held == 3  # full: the caller allocates its own memory
    b.release()
    d = ring.take(SHAPE)
    assert d.index == 1 and not np.shares_memory(d.x, a.x) and not np.shares_memory(d.x, c.x)
    b.release()  # a second release of b must not free d's slot
    assert ring.held == 3 and ring.take(SHAPE) is None
    for x in (a, c, d):
        x.release()
    assert ring.held == 0
    assert ring.take(SHAPE).index == 0  # an empty ring starts over: at a steady line rate one slot is used


def test_a_new_input_size_replaces_the_buffer_and_old_leases_release_nothing():
    ring = InputRing(2)
    old = ring.take(SHAPE)
    old.x[:] = 7.0
    new = ring.take((2, 5, 4))
    assert new.x.shape == (2, 5, 4) and new.index == 0
    old.release()  # belongs to the replaced buffer: slot 0 of the new one stays held
    assert ring.held == 1 and np.all(old.x == 7.0)
    with pytest.raises(ValueError):
        InputRing(0)


def test_runs_of_adjacent_slots_are_views_and_the_rest_is_one_copied_run():
    ring = InputRing(4)
    leases = [ring.take(SHAPE) for _ in range(4)]
    for i, lease in enumerate(leases):
        lease.x[:] = i
    xs = [lease.x for lease in leases]
    view = adjacent_view(xs[1:3])
    assert view is not None and np.shares_memory(view, leases[1].x) and np.array_equal(view, np.stack(xs[1:3]))
    loose = np.full(SHAPE, 9.0, np.float32)
    # Wrapped around the ring (3, 0, 1) with a unit that has its own memory in the middle.
    batch = [xs[3], loose, xs[0], xs[1]]
    assert model_runs(batch) == [[2, 3], [0, 1]]
    assert adjacent_view([xs[3], xs[0]]) is None and adjacent_view([xs[0], xs[2]]) is None
    assert adjacent_view([xs[0]]) is None
    assert model_runs([np.zeros(SHAPE, np.float32) for _ in range(3)]) == [[0, 1, 2]]  # one batch, as before


def test_preprocess_writes_into_the_memory_it_is_given():
    spec = InputSpec(frames=2, pad_multiple=32)
    rng = np.random.default_rng(3)
    for frames in ([rng.integers(0, 256, (37, 50), dtype=np.uint8) for _ in range(2)],  # lookup-table path
                   [rng.integers(0, 65536, (37, 50), dtype=np.uint16) for _ in range(2)]):  # general path
        out = np.full(input_shape(frames[0].shape, spec), np.nan, np.float32)
        p = preprocess(frames, spec, out=out)
        assert p.x is out and np.array_equal(out, preprocess(frames, spec).x)
    assert input_shape((1024, 512), InputSpec(frames=1, max_side=256)) == (1, 256, 128)
    with pytest.raises(ValueError, match="output"):
        preprocess([np.zeros((37, 50), np.uint8)] * 2, spec, out=np.empty((2, 32, 32), np.float32))
