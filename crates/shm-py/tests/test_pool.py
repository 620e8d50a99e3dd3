"""Pools of workers from Python: map with progress, broadcast, deaths and Ctrl-C."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import PYTHON_WORKER, RUST_WORKER

import shm


@pytest.fixture
def pool(clean_shm):
    with shm.WorkerPool([RUST_WORKER], 2) as p:
        yield p


def test_map_keeps_the_order_of_1000_items_and_reports_progress(pool):
    items = [np.full(1000 + i, float(i)) for i in range(1000)]
    seen = []
    sums = pool.map("sum", items, progress=lambda done, total: seen.append((done, total)), returns="f64")
    assert sums == [float(i * (1000 + i)) for i in range(1000)]
    assert seen == [(done, 1000) for done in range(1, 1001)]


def test_map_spreads_calls_over_every_worker_and_takes_a_tqdm_bar(pool):
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    pids = pool.map("pid", iter([None] * 200), progress=bar, returns="u32")
    assert bar.n == 200
    assert set(pids) == set(pool.pids)


def test_broadcast_writes_once_and_reaches_every_worker(pool):
    a = pool.empty(1_000_000)
    a[:] = 2.0
    where = pool.broadcast("locate", a, returns=(("str", "u64"), "f64"))
    assert [tuple(w) for w, _ in where] == [shm.block_of(a).location()] * 2
    assert [total for _, total in where] == [2_000_000.0] * 2
    assert sorted(pool.broadcast("pid", returns="u32")) == sorted(pool.pids)


def test_a_failed_call_fails_the_map(pool):
    with pytest.raises(shm.RemoteError) as err:
        pool.map("echo", [shm.Serde(1, "u64"), np.ones(3)], returns="u64")
    assert err.value.args[1] == "bad-arguments"


def test_a_killed_worker_fails_its_own_call_and_the_pool_restarts_it(pool):
    before = pool.pids
    result = []
    call = threading.Thread(target=lambda: result.append(catch(pool.call, "sleep", shm.Serde(30_000, "u64"))))
    call.start()
    time.sleep(0.3)
    busy = [pid for pid in before if is_sleeping(pid)]
    os.kill(busy[0], signal.SIGKILL)
    call.join(10)
    assert isinstance(result[0], shm.WorkerDied)
    deadline = time.monotonic() + 30
    while busy[0] in pool.pids or None in pool.pids:
        assert time.monotonic() < deadline, "the killed worker did not come back"
        time.sleep(0.01)
    assert pool.map("echo", [shm.Serde(i, "u64") for i in range(20)], returns="u64") == list(range(20))


def test_ctrl_c_ends_a_map_at_once_and_the_pool_goes_on(pool):
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pool.map("sleep", [shm.Serde(30_000, "u64")] * 8)
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 30
    while True:
        try:
            assert pool.map("echo", [shm.Serde(i, "u64") for i in range(8)], returns="u64") == list(range(8))
            break
        except shm.WorkerDied:
            # A call can reach a worker just killed, before the pool has restarted it.
            assert time.monotonic() < deadline, "the pool did not come back after Ctrl-C"
            time.sleep(0.05)


def test_a_pool_of_python_workers(clean_shm):
    with shm.WorkerPool(PYTHON_WORKER, 2) as pool:
        items = [np.arange(float(i)) for i in range(1, 101)]
        assert pool.map("sum", items, returns="f64") == [a.sum() for a in items]


def catch(f, *args):
    try:
        return f(*args)
    except shm.Error as err:
        return err


def is_sleeping(pid):
    """Whether the worker `pid` is inside its handler's sleep (its main thread waits in a
    nanosleep rather than on the channel's futex)."""
    with open(f"/proc/{pid}/task/{pid}/syscall") as syscall:
        return syscall.read().split()[0] in ("35", "230")  # nanosleep, clock_nanosleep
