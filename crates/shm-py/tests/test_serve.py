"""Python programs as workers (`shm.serve`, in served.py): called by a Rust parent and by a
Python one."""

import os
import subprocess
import time

import numpy as np
import pytest
from conftest import PYTHON_WORKER

import shm

PARENT = os.environ["SHM_TEST_PYTHON_PARENT"]


def test_a_rust_parent_calls_a_python_worker(clean_shm):
    run = subprocess.run([PARENT, *PYTHON_WORKER], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "all checks passed"


def test_a_python_worker_writes_its_result_in_place(python_worker):
    a = np.linspace(0, 1, 100_000)
    doubled = python_worker.call("double", a)
    np.testing.assert_array_equal(doubled, 2 * a)
    assert isinstance(doubled.base, shm.Block) and not doubled.flags.writeable
    assert doubled.ctypes.data == doubled.base.address()


def test_a_python_worker_reads_the_parents_array_in_place(python_worker):
    a = python_worker.empty(1_000_000, np.int64)
    a[:] = np.arange(1_000_000)
    assert python_worker.call("sum", a, returns="f64") == a.sum()


# Every dtype, in every layout, and the shapes that are easy to get wrong.
DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f4", "f8", "c8", "c16"]


def arrays(dtype):
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=16 * 60 * 50, dtype=np.uint8)
    base = raw.view(np.dtype(dtype).newbyteorder("<") if dtype != "?" else np.uint8)[: 60 * 50].reshape(60, 50)
    if dtype == "?":
        base = base % 2 == 1
    return {
        "C": base,
        "F": np.asfortranarray(base),
        "strided": base[::3, ::-2],
        "0-d": base[3:4, 4:5].reshape(()),
        "empty": base[:0],
        "inline": base[:2, :3],
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrays_of_every_dtype_and_layout_round_trip(python_worker, dtype):
    for layout, a in arrays(dtype).items():
        back = python_worker.call("echo", a)
        assert back.dtype == a.dtype and back.shape == a.shape, layout
        if a.dtype.kind in "fc":
            # Random bits make NaNs: compare the bytes of every element.
            np.testing.assert_array_equal(bytes_of(back), bytes_of(a), layout)
        else:
            np.testing.assert_array_equal(back, a, layout)


VALUES = [
    None,
    True,
    0,
    -(2**63),
    2**63 - 1,
    1.5,
    float("inf"),
    "",
    "naïve ☃",
    b"\x00\xff" * 1000,
    [1, 2, 3],
    ["a", "b"],
    [1, "mixed", None, [2.5, {"k": b"v"}]],
    {"a": 1, "b": [True, False], "c": {"d": None}, 7: "int key"},
    (1, "two", 3.0),
    ("x" * (2 << 20), 5),  # above 1 MiB: a serde value in a block of its own
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_plain_values_round_trip_as_self_describing_values(python_worker, value):
    back = python_worker.call("echo_value", shm.Serde(value, "any"), returns="any")
    # A tuple travels as a list: "any" has one kind of sequence.
    assert back == (list(value) if isinstance(value, tuple) else value)


def test_plain_values_round_trip_with_their_inferred_schema(python_worker):
    for value in VALUES:
        if isinstance(value, (dict, list)) or value is None:
            continue
        schema = shm.Serde(value).schema
        assert python_worker.call("echo", value, returns=schema) == value


def test_tuples_of_arrays_and_values_round_trip(python_worker):
    x = np.arange(10_000.0)
    a, label, b = python_worker.call("echo", (x, shm.Serde("label", "str"), x[::-1].astype(np.int32)), returns=(None, "str", None))
    np.testing.assert_array_equal(a, x)
    assert label == "label"
    np.testing.assert_array_equal(b, x[::-1].astype(np.int32))


def test_a_python_handlers_errors_reach_the_caller_with_their_kind(python_worker):
    with pytest.raises(shm.RemoteError) as err:
        python_worker.call("fail")
    message, kind, method = err.value.args
    assert (kind, method) == ("handler", "fail") and message == "ValueError: the handler says no"
    with pytest.raises(shm.RemoteError) as err:
        python_worker.call("half_f64", "not a float")
    assert err.value.args[1] == "bad-arguments"
    assert python_worker.call("half_f64", 5.0, returns="f64") == 2.5


def test_serve_outside_a_worker_raises():
    with pytest.raises(shm.Error):
        shm.serve({"x": lambda v: v})
    assert not shm.is_worker()


def test_a_python_worker_whose_parent_dies_exits(clean_shm, tmp_path):
    # The parent is a Python process that starts the worker, prints its pid, then is killed.
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time, shm\n"
        f"w = shm.Worker({PYTHON_WORKER!r})\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([PYTHON_WORKER[0], str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "the worker outlived its parent by 10 s"
        time.sleep(0.01)


def alive(pid):
    """Whether a process runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def bytes_of(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


@pytest.mark.parametrize("index", [None, range(10, 40, 3), [f"r{i}" for i in range(10)]])
def test_frames_round_trip_with_their_index(python_worker, index):
    data = np.arange(30.0).reshape(10, 3)
    frame = shm.Frame(data, ["x", "y", "x"], index)
    back = python_worker.call("echo", frame)
    np.testing.assert_array_equal(back.array, data)
    assert back.columns == ["x", "y", "x"]
    assert list(back.index) == list(frame.index)
