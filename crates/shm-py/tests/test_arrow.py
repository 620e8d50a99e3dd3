"""pyarrow batches and tables as `arrow-columns` payloads, to Rust and Python workers."""

import numpy as np
import pyarrow as pa
import pytest

import shm

ROWS = 20_000


def every_kind(rows=ROWS):
    """Columns of many Arrow types, with nulls."""
    i = np.arange(rows)
    return pa.record_batch(
        {
            "i8": pa.array(i % 100, pa.int8()),
            "u64": pa.array(i, pa.uint64()),
            "f32": pa.array(i / 3, pa.float32()),
            "f64": pa.array([None if k % 5 == 0 else k / 7 for k in range(rows)]),
            "bool": pa.array([None if k % 11 == 0 else k % 2 == 0 for k in range(rows)]),
            "str": pa.array([None if k % 7 == 0 else f"row {k} ☃" for k in range(rows)]),
            "large_str": pa.array([f"{k}" for k in range(rows)], pa.large_string()),
            "binary": pa.array([bytes([k % 256]) * (k % 5) for k in range(rows)]),
            "dict": pa.array(["a", "b", None, "c"] * (rows // 4)).dictionary_encode(),
            "ts": pa.array(i, pa.timestamp("us", tz="Europe/Paris")),
            "date": pa.array(i.astype(np.int32), pa.date32()),
            "decimal": pa.array([k for k in range(rows)], pa.decimal128(12, 2)),
            "list": pa.array([None if k % 3 == 0 else [k, None, -k] for k in range(rows)]),
            "struct": pa.array([{"x": k, "y": str(k)} for k in range(rows)]),
            "fixed": pa.array([[k, k] for k in range(rows)], pa.list_(pa.int16(), 2)),
            "nulls": pa.nulls(rows),
        },
        metadata={"source": "test"},
    )


@pytest.fixture(params=["rust", "python"])
def any_worker(request, worker, python_worker):
    return {"rust": (worker, "batch"), "python": (python_worker, "echo")}[request.param]


def test_a_batch_of_every_kind_round_trips_and_comes_back_without_a_copy(any_worker):
    w, method = any_worker
    batch = every_kind()
    before = pa.total_allocated_bytes()
    back = w.call(method, batch)
    # The reply's buffers are the worker's shared memory: pyarrow allocated nothing for them.
    assert pa.total_allocated_bytes() == before
    assert back.equals(batch) and back.schema.metadata == batch.schema.metadata
    back.validate(full=True)


def test_slices_and_chunked_tables_arrive_as_one_batch(any_worker):
    w, method = any_worker
    batch = every_kind(1000)
    assert w.call(method, batch.slice(333, 100)).equals(batch.slice(333, 100))
    table = pa.Table.from_batches([batch.slice(0, 400), batch.slice(400, 600)])
    back = w.call(method, table)
    assert isinstance(back, pa.RecordBatch) and pa.Table.from_batches([back]).equals(table.combine_chunks())
    empty = batch.slice(0, 0)
    assert w.call(method, empty).equals(empty)


def test_a_batch_a_worker_returned_goes_back_as_it_is(worker):
    batch = every_kind(5000)
    back = worker.call("batch", batch)
    assert worker.call("batch", back).equals(batch)


def test_ten_thousand_columns(worker):
    batch = pa.record_batch({f"c{i}": pa.array(np.arange(5) + i) for i in range(10_000)})
    assert worker.call("batch", batch).equals(batch)


def test_a_batch_and_arrays_in_one_tuple(python_worker):
    batch, a = python_worker.call("echo", (every_kind(100), np.arange(3000.0)))
    assert batch.equals(every_kind(100))
    np.testing.assert_array_equal(a, np.arange(3000.0))


def test_what_is_not_a_batch_is_refused(worker):
    with pytest.raises(TypeError):
        worker.call("batch", pa.array([1, 2, 3]))
