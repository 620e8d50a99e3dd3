"""shm for Python (work in progress): call a worker process with numpy arrays in shared memory.

    import numpy as np, shm
    with shm.Worker(["path/to/worker"]) as w:
        total = w.call("sum", np.arange(1e8), returns="f64")   # one copy into shared memory
        doubled = w.call("double", np.ones(10))                 # a read-only view of the
                                                                # worker's block, no copy

Values travel as docs/format.md describes them: numpy arrays as `ndarray` payloads, everything
else as postcard (`serde`), whose Rust type a caller names with a schema: "u64", "i64", "f64",
"f32", "bool", "str", "bytes", "unit", a tuple of schemas, or a one-element list for a Vec.
"""

import struct

import numpy as np

from ._shm import (  # noqa: F401
    Block,
    Error,
    OutOfSharedMemory,
    RawWorker,
    RemoteError,
    Timeout,
    WorkerDied,
)

__all__ = [
    "Worker",
    "Serde",
    "Block",
    "Error",
    "OutOfSharedMemory",
    "RemoteError",
    "Timeout",
    "WorkerDied",
]

# Arrays this small travel inside the message rather than in a block of their own.
INLINE_BYTES = 1024

# --- postcard (docs/format.md, "postcard, the encoding of every message") ------------------------


def _varint(n):
    if n < 0:
        raise ValueError(f"{n} is negative")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _zigzag(n):
    return _varint((n << 1) ^ (n >> 63))


class _Reader:
    def __init__(self, data):
        self.data, self.pos = memoryview(data).cast("B"), 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Error(f"a reply of {len(self.data)} bytes ends inside a value")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def varint(self):
        n, shift = 0, 0
        while True:
            (byte,) = self.take(1)
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise Error("a varint longer than 10 bytes")

    def zigzag(self):
        n = self.varint()
        return (n >> 1) ^ -(n & 1)


def _encode(value, schema):
    if isinstance(schema, tuple):
        if len(value) != len(schema):
            raise ValueError(f"{len(value)} values for a tuple of {len(schema)}")
        return b"".join(_encode(v, s) for v, s in zip(value, schema))
    if isinstance(schema, list):
        (inner,) = schema
        return _varint(len(value)) + b"".join(_encode(v, inner) for v in value)
    if schema in ("u8", "u16", "u32", "u64", "usize"):
        return _varint(int(value))
    if schema in ("i8", "i16", "i32", "i64", "isize"):
        return _zigzag(int(value))
    if schema == "f64":
        return struct.pack("<d", value)
    if schema == "f32":
        return struct.pack("<f", value)
    if schema == "bool":
        return b"\x01" if value else b"\x00"
    if schema == "str":
        data = value.encode()
        return _varint(len(data)) + data
    if schema == "bytes":
        return _varint(len(value)) + bytes(value)
    if schema == "unit":
        return b""
    raise ValueError(f"unknown schema {schema!r}")


def _decode(reader, schema):
    if isinstance(schema, tuple):
        return tuple(_decode(reader, s) for s in schema)
    if isinstance(schema, list):
        (inner,) = schema
        return [_decode(reader, inner) for _ in range(reader.varint())]
    if schema in ("u8", "u16", "u32", "u64", "usize"):
        return reader.varint()
    if schema in ("i8", "i16", "i32", "i64", "isize"):
        return reader.zigzag()
    if schema == "f64":
        return struct.unpack("<d", reader.take(8))[0]
    if schema == "f32":
        return struct.unpack("<f", reader.take(4))[0]
    if schema == "bool":
        (byte,) = reader.take(1)
        if byte > 1:
            raise Error(f"a bool byte of {byte}")
        return bool(byte)
    if schema == "str":
        return reader.take(reader.varint()).decode()
    if schema == "bytes":
        return reader.take(reader.varint())
    if schema == "unit":
        return None
    raise ValueError(f"unknown schema {schema!r}")


def _schema_of(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "i64"
    if isinstance(value, float):
        return "f64"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if value is None:
        return "unit"
    if isinstance(value, tuple):
        return tuple(_schema_of(v) for v in value)
    if isinstance(value, list) and value:
        return [_schema_of(value[0])]
    raise TypeError(f"no schema for {type(value).__name__}; pass shm.Serde(value, schema)")


class Serde:
    """A plain value and the Rust type it is read as: `Serde(7, "u64")`, `Serde((2, 3.0), ("usize", "f64"))`."""

    def __init__(self, value, schema=None):
        self.value = value
        self.schema = _schema_of(value) if schema is None else schema


# --- ndarray (docs/format.md, "`ndarray`: arrays") ----------------------------------------------


def _array_payload(a):
    """(meta, inline, data) of an array: C order as it is, F order as it is, anything else
    copied into C order first."""
    if a.dtype.str not in _TYPESTRS:
        raise TypeError(f"arrays of {a.dtype} do not travel; shm has {sorted(_TYPESTRS)}")
    if a.flags.c_contiguous:
        data = a
    elif a.flags.f_contiguous:
        data = a.T
    else:
        a = np.ascontiguousarray(a)
        data = a
    meta = (
        _encode(a.dtype.str, "str")
        + _encode(list(a.shape), ["u64"])
        + _encode(list(a.strides), ["i64"])
        + _varint(0)
    )
    raw = memoryview(data.reshape(-1) if data.ndim else data.reshape(1)).cast("B")
    if a.nbytes <= INLINE_BYTES:
        return meta, bytes(raw), None
    return meta, b"", raw


_TYPESTRS = {"|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f4", "<f8", "<c8", "<c16"}


def _array_from(meta, inline, block):
    r = _Reader(meta)
    typestr = _decode(r, "str")
    shape = _decode(r, ["u64"])
    strides = _decode(r, ["i64"])
    origin = r.varint()
    if typestr not in _TYPESTRS:
        raise Error(f"an array of typestr {typestr!r}")
    if len(strides) != len(shape):
        raise Error(f"{len(strides)} strides for {len(shape)} axes")
    buffer = block if block is not None else inline
    a = np.ndarray(tuple(shape), dtype=np.dtype(typestr), buffer=buffer, offset=origin, strides=tuple(strides))
    a.flags.writeable = False
    if typestr == "|b1" and a.size and a.view(np.uint8).max() > 1:
        raise Error("a bool array holds bytes other than 0 and 1")
    return a


# --- the worker ---------------------------------------------------------------------------------


class Worker:
    """A worker process: `argv` is its command line (a Rust binary that serves a Router)."""

    def __init__(self, argv, untrusted=False):
        self._raw = RawWorker([str(a) for a in argv], untrusted)

    def call(self, method, value=None, timeout=None, returns=None):
        """Calls `method` with `value` (a numpy array, a `Serde`, a plain value or None for a
        handler without arguments) and returns its result: an array for an `ndarray` reply, a
        value read as `returns` (a schema) for a `serde` one."""
        if isinstance(value, np.ndarray):
            meta, inline, data = _array_payload(value)
            reply = self._raw.call(method, "ndarray", meta, inline, data, timeout)
        elif value is None:
            reply = self._raw.call(method, "tuple", _varint(0), b"", None, timeout)
        else:
            value = value if isinstance(value, Serde) else Serde(value)
            reply = self._raw.call(method, "serde", b"", _encode(value.value, value.schema), None, timeout)
        codec, meta, inline, block = reply
        if codec == "ndarray":
            return _array_from(meta, inline, block)
        if codec == "serde":
            data = inline if block is None else block
            if returns is None:
                return bytes(data)
            reader = _Reader(data)
            out = _decode(reader, returns)
            if reader.pos != len(reader.data):
                raise Error(f"{len(reader.data) - reader.pos} bytes left after a {returns!r}")
            return out
        if codec == "tuple" and meta == _varint(0):
            return None
        raise Error(f"a reply of codec {codec!r}, which this module does not read yet")

    def restart(self):
        self._raw.restart()

    def kill(self):
        self._raw.kill()

    @property
    def pid(self):
        return self._raw.pid()

    def close(self):
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
