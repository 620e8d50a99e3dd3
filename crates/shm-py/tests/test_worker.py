"""A Python parent calling the Rust test worker (tests/src/bin/shm-test-worker.rs), whose path
is in SHM_TEST_WORKER."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import RUST_WORKER as WORKER
from conftest import shm_listing

import shm


def test_a_large_array_is_summed_by_the_worker(worker):
    a = np.arange(10_000_000, dtype=np.float64)
    assert worker.call("sum", a, returns="f64") == a.sum()


def test_a_result_is_a_read_only_view_of_the_workers_block(worker):
    a = np.linspace(0, 1, 100_000)
    doubled = worker.call("double", a)
    assert doubled.dtype == np.float64 and doubled.shape == a.shape
    assert not doubled.flags.writeable and not doubled.flags.owndata
    assert isinstance(doubled.base, shm.Block)
    assert doubled.ctypes.data == doubled.base.address()
    np.testing.assert_array_equal(doubled, 2 * a)


@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_arrays_of_every_layout_arrive_as_they_were(worker, order):
    base = np.arange(600.0).reshape(20, 30)
    a = {"C": base, "F": np.asfortranarray(base), "strided": base[::2, ::-3]}[order]
    np.testing.assert_array_equal(worker.call("double", a), 2 * a)


def test_the_readme_sum_reads_100m_floats_in_the_parents_memory(worker):
    n = 100_000_000
    a = worker.empty(n)
    a[:] = 0.5
    a[-1] = 7.0
    block = shm.block_of(a)
    assert not block.frozen()
    (where, total) = worker.call("locate", a, returns=(("str", "u64"), "f64"))
    # The worker summed the very block this process wrote: same segment, same offset.
    assert tuple(where) == block.location()
    assert total == 0.5 * (n - 1) + 7.0
    # Sent, the array is frozen: it can be read and sent again, no longer written.
    assert block.frozen() and not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1.0
    assert memoryview(block).readonly
    assert worker.call("sum", a[::2], returns="f64") == 0.5 * (n // 2)


def test_a_slice_of_a_block_is_sent_as_that_block_with_its_own_layout(worker):
    a = worker.empty((300, 400))
    a[:] = np.arange(120_000.0).reshape(300, 400)
    for view in (a[10:200, ::-3], a.T, a[5]):
        where, total = worker.call("locate", view, returns=(("str", "u64"), "f64"))
        assert tuple(where) == shm.block_of(a).location() and total == view.sum()
    np.testing.assert_array_equal(worker.call("double", a[::7, 1::2]), 2 * a[::7, 1::2])


def test_small_arrays_travel_inline(worker):
    a = np.array([1.5, 2.5])
    assert worker.call("sum", a, returns="f64") == 4.0


def test_plain_values_round_trip_with_their_schema(worker):
    assert worker.call("echo", shm.Serde(2**64 - 1, "u64"), returns="u64") == 2**64 - 1
    filled = worker.call("fill", shm.Serde((5, 0.25), ("usize", "f64")))
    np.testing.assert_array_equal(filled, np.full(5, 0.25))


def test_self_describing_values_round_trip_through_rust(worker):
    value = {"name": "é", "n": -(2**63), "max": 2**63 - 1, "xs": [1, 2.5, None, True, b"\x00\xff"], 3: {"deep": [[[]]]}}
    assert worker.call("echo_value", shm.Serde(value, "any"), returns="any") == value
    # Dicts and mixed lists are sent as "any" without being told.
    assert worker.call("echo_value", {"a": [1, "b"]}, returns="any") == {"a": [1, "b"]}
    with pytest.raises(OverflowError):
        worker.call("echo_value", shm.Serde(2**63, "any"))


def test_a_tuple_with_arrays_is_several_arguments(worker):
    x, y = np.arange(5000.0), np.ones(5000)
    np.testing.assert_array_equal(worker.call("axpy", (shm.Serde(2.0, "f64"), x, y)), 2 * x + y)
    a, b = worker.call("fill_pair", shm.Serde((3000, 1.5), ("usize", "f64")))
    np.testing.assert_array_equal(a, np.full(3000, 1.5))
    np.testing.assert_array_equal(b, np.full(3000, -1.5))


def test_a_failing_handler_raises_remote_error_with_its_kind(worker):
    with pytest.raises(shm.RemoteError) as err:
        worker.call("fail")
    message, kind, method = err.value.args
    assert (kind, method) == ("handler", "fail") and "says no" in message
    with pytest.raises(shm.RemoteError) as err:
        worker.call("no such method")
    assert err.value.args[1] == "unknown-method"


def test_a_call_past_its_timeout_raises_timeout(worker):
    with pytest.raises(shm.Timeout):
        worker.call("sleep", shm.Serde(2_000, "u64"), timeout=0.05)


def test_a_killed_worker_raises_worker_died_and_restarts(worker):
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(shm.WorkerDied):
        worker.call("echo", shm.Serde(1, "u64"), returns="u64")
    worker.restart()
    assert worker.call("echo", shm.Serde(7, "u64"), returns="u64") == 7


def test_a_view_outlives_the_worker_that_made_it():
    before = shm_listing()
    w = shm.Worker([WORKER])
    doubled = w.call("double", np.ones(100_000))
    w.close()
    assert doubled.sum() == 200_000
    del doubled
    assert shm_listing() == before


def test_ctrl_c_ends_a_waiting_call_at_once(worker):
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        worker.call("sleep", shm.Serde(30_000, "u64"))
    assert time.monotonic() - started < 5
    # The interrupted call's worker was killed; it comes back.
    worker.restart()
    assert worker.call("echo", shm.Serde(3, "u64"), returns="u64") == 3


def test_closing_a_worker_ends_a_call_under_way_on_another_thread():
    before = shm_listing()
    w = shm.Worker([WORKER])
    outcome = []

    def call():
        try:
            w.call("sleep", shm.Serde(30_000, "u64"))
        except shm.Error as err:
            outcome.append(err)

    thread = threading.Thread(target=call)
    thread.start()
    threading.Event().wait(0.3)
    w.close()
    thread.join(10)
    assert not thread.is_alive(), "the call outlived close()"
    assert len(outcome) == 1 and isinstance(outcome[0], shm.WorkerDied)
    assert shm_listing() == before


def test_a_frame_reaches_a_rust_handler_with_its_labels(worker):
    data = np.asfortranarray(np.arange(3000.0).reshape(1000, 3))
    columns, sums = worker.call("column_sums", shm.Frame(data, ["a", "b", "c"]), returns=(["str"], ["f64"]))
    assert columns == ["a", "b", "c"] and sums == list(data.sum(axis=0))
