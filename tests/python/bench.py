"""Python baselines of shm's benchmark (cargo xtask bench): what a Python user would do instead.

Commands print the median round trip in seconds of RUNS runs (after one warm-up):
  pipe-array BYTES RUNS    multiprocessing Pipe, pickle protocol 5: send a float64 array,
                           the child sums it and sends the sum back
  shm-array BYTES RUNS     multiprocessing.shared_memory + numpy: copy the array into a new
                           segment, send its name, the child maps and sums it, the parent unlinks
  pipe-ipc ROWS RUNS       pyarrow IPC stream over a Pipe: send a table of six mixed columns,
                           the child reads it and sends back its row count
"""

import pickle
import statistics
import sys
import time
from multiprocessing import Pipe, Process, resource_tracker, shared_memory

import numpy as np
import pyarrow as pa


def pipe_child(conn):
    while True:
        message = conn.recv_bytes()
        if not message:
            return
        array = pickle.loads(message)
        conn.send_bytes(pickle.dumps(float(array.sum()), protocol=5))


def shm_child(conn):
    while True:
        message = conn.recv()
        if message is None:
            return
        name, count = message
        shm = shared_memory.SharedMemory(name=name, create=False)
        resource_tracker.unregister(shm._name, "shared_memory")
        array = np.ndarray((count,), dtype=np.float64, buffer=shm.buf)
        total = float(array.sum())
        del array
        shm.close()
        conn.send(total)


def ipc_child(conn):
    while True:
        message = conn.recv_bytes()
        if not message:
            return
        table = pa.ipc.open_stream(pa.py_buffer(message)).read_all()
        conn.send(table.num_rows)


def table(rows):
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon"])
    index = np.arange(rows)
    return pa.table({
        "f64": pa.array(index * 0.5),
        "i64": pa.array(index * 3),
        "utf8": pa.array([f"row-{i:07}" for i in range(rows)]),
        "dict": pa.DictionaryArray.from_arrays(pa.array(index % 5, type=pa.int32()), pa.array(words)),
        "ts_tz": pa.array(index * 1_000_000, type=pa.timestamp("us", tz="Europe/Zurich")),
        "bool": pa.array(index % 2 == 0, mask=index % 11 == 0),
    })


def measure(runs, once):
    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    command, size, runs = argv[1], int(argv[2]), int(argv[3])
    parent, child = Pipe()
    if command == "pipe-array":
        array = np.arange(size // 8, dtype=np.float64)
        worker = Process(target=pipe_child, args=(child,))
        worker.start()

        def once():
            parent.send_bytes(pickle.dumps(array, protocol=5))
            pickle.loads(parent.recv_bytes())

        result = measure(runs, once)
        parent.send_bytes(b"")
    elif command == "shm-array":
        array = np.arange(size // 8, dtype=np.float64)
        worker = Process(target=shm_child, args=(child,))
        worker.start()

        def once():
            shm = shared_memory.SharedMemory(create=True, size=max(array.nbytes, 1))
            target = np.ndarray(array.shape, dtype=array.dtype, buffer=shm.buf)
            target[...] = array
            del target
            parent.send((shm.name, array.size))
            parent.recv()
            shm.close()
            shm.unlink()

        result = measure(runs, once)
        parent.send(None)
    elif command == "pipe-ipc":
        data = table(size)
        worker = Process(target=ipc_child, args=(child,))
        worker.start()

        def once():
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, data.schema) as writer:
                writer.write_table(data)
            parent.send_bytes(sink.getvalue().to_pybytes())
            parent.recv()

        result = measure(runs, once)
        parent.send_bytes(b"")
    else:
        raise SystemExit(f"unknown command {command}")
    worker.join()
    print(result)


if __name__ == "__main__":
    main(sys.argv)
