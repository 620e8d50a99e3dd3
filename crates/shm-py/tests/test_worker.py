"""A Python parent calling the Rust test worker (tests/src/bin/shm-test-worker.rs), whose path
is in SHM_TEST_WORKER."""

import os
import signal

import numpy as np
import pytest

import shm

WORKER = os.environ["SHM_TEST_WORKER"]


def shm_listing():
    return sorted(os.listdir("/dev/shm"))


@pytest.fixture
def worker():
    before = shm_listing()
    with shm.Worker([WORKER]) as w:
        yield w
    assert shm_listing() == before


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


def test_small_arrays_travel_inline(worker):
    a = np.array([1.5, 2.5])
    assert worker.call("sum", a, returns="f64") == 4.0


def test_plain_values_round_trip_with_their_schema(worker):
    assert worker.call("echo", shm.Serde(2**64 - 1, "u64"), returns="u64") == 2**64 - 1
    filled = worker.call("fill", shm.Serde((5, 0.25), ("usize", "f64")))
    np.testing.assert_array_equal(filled, np.full(5, 0.25))


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
    import threading
    import time

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
    import threading

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
