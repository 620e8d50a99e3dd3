"""The Python side of shm's interop tests: reads what Rust wrote into shared memory, and writes
what Rust reads, with numpy and pyarrow as the reference implementations.

Commands (one per run):
  read-ipc NAME OFFSET SIZE           print the table in an Arrow IPC stream block
  write-ipc                           write a known table as an IPC stream into a new segment,
                                      print "NAME SIZE", wait for stdin to close, unlink it
  write-ipc-decimals                  the same with decimal columns after one-byte ones, so that
                                      their buffers are 8- but not 16-byte aligned
  read-array NAME OFFSET SIZE TYPESTR SHAPE STRIDES ORIGIN
                                      view an array from shm's array metadata, print it
  write-arrays                        write known arrays into one new segment (Fortran order,
                                      C order at an odd offset, a reversed view, complex), print
                                      "NAME OFFSET TYPESTR SHAPE STRIDES" for each (strides "C"
                                      when numpy's array interface says None), then "end", wait,
                                      unlink

The read commands take the names of shm's segments (with their leading slash), whose
descriptors come on the link in SHM_TEST_LINK (shmlink.py); the write commands make segments
by name with Python's SharedMemory, as a numpy program would, and print the names as it gives
them: without the leading slash.
"""

import sys
from multiprocessing import shared_memory

import numpy as np
import pyarrow as pa

from shmlink import Link


def attach(name):
    """The mapping of one of the Rust test's segments, from the link."""
    return memoryview(Link.from_env("SHM_TEST_LINK").segment(name))


def csv_ints(text):
    return tuple(int(x) for x in text.split(",") if x != "")


def wait_for_stdin_to_close():
    for _ in sys.stdin:
        pass


def read_ipc(name, offset, size):
    data = pa.py_buffer(attach(name)[offset:offset + size])
    table = pa.ipc.open_stream(data).read_all()
    print(table.num_rows)
    print(table.schema.names)
    print(table.to_pydict())


def known_table():
    return pa.table({
        "id": pa.array([1, 2, None, 4], type=pa.int64()),
        "name": pa.array(["alpha", None, "gamma", "delta"]),
        "score": pa.array([0.5, 1.5, 2.5, None], type=pa.float64()),
        "kind": pa.array(["u", "v", "u", "u"]).dictionary_encode(),
        "ok": pa.array([True, False, None, True]),
    })


def decimal_table():
    from decimal import Decimal
    return pa.table({
        "flag": pa.array([1, 2, 3], type=pa.int8()),
        "d128": pa.array([Decimal("1.23"), Decimal("-4.56"), None], type=pa.decimal128(10, 2)),
        "tiny": pa.array([7, 8, 9], type=pa.uint8()),
        "d256": pa.array([Decimal("12345.678"), None, Decimal("-0.001")], type=pa.decimal256(40, 3)),
    })


def write_ipc(table):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data = sink.getvalue()
    shm = shared_memory.SharedMemory(create=True, size=data.size)
    shm.buf[:data.size] = data.to_pybytes()
    print(shm.name, data.size, flush=True)
    wait_for_stdin_to_close()
    shm.close()
    shm.unlink()


def read_array(name, offset, size, typestr, shape, strides, origin):
    view = attach(name)[offset:offset + size]
    array = np.ndarray(shape, dtype=np.dtype(typestr), buffer=view, offset=origin, strides=strides)
    print(array.shape, array.dtype.str)
    print(repr(array.tolist()))


def write_arrays():
    shm = shared_memory.SharedMemory(create=True, size=4096)
    arrays = []

    def place(offset, shape, dtype, order="C"):
        target = np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=offset, order=order)
        arrays.append(target)
        return target

    place(0, (3, 4), np.float64, order="F")[...] = np.arange(12).reshape(3, 4) * 1.5
    place(100, (2, 3), np.int32)[...] = np.array([[1, -2, 3], [-4, 5, -6]])
    forward = place(256, (5,), np.uint16)
    forward[...] = [10, 20, 30, 40, 50]
    arrays[-1] = forward[::-2]
    place(512, (3,), np.complex128)[...] = [1 + 2j, -3j, 4]
    base = np.frombuffer(shm.buf, dtype=np.uint8).ctypes.data
    for a in arrays:
        interface = a.__array_interface__
        strides = interface["strides"]
        print(shm.name, a.ctypes.data - base, interface["typestr"],
              ",".join(str(n) for n in a.shape),
              "C" if strides is None else ",".join(str(n) for n in strides), flush=True)
    print("end", flush=True)
    del arrays, forward, base
    wait_for_stdin_to_close()
    shm.close()
    shm.unlink()


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "read-ipc":
        read_ipc(args[0], int(args[1]), int(args[2]))
    elif command == "write-ipc":
        write_ipc(known_table())
    elif command == "write-ipc-decimals":
        write_ipc(decimal_table())
    elif command == "read-array":
        read_array(args[0], int(args[1]), int(args[2]), args[3], csv_ints(args[4]), csv_ints(args[5]), int(args[6]))
    elif command == "write-arrays":
        write_arrays()
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
