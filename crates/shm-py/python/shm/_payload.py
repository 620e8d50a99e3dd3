"""Values and payloads (docs/format.md, "Payload: an encoded value"): numpy arrays as
`ndarray`, pyarrow batches and tables as `arrow-columns`, plain values as `serde`, tuples with
arrays in them as `tuple`, and back.

`native` is the object of the native half that owns the pool values go to and come from (a
`RawWorker`, or a served call's context): Arrow payloads are made and read there."""

import numpy as np

from . import _postcard as pc
from ._shm import Block, BlockMut, Error

# Arrays this small travel inside the message rather than in a block of their own.
INLINE_BYTES = 1024
# Plain values above this size travel in a block of their own (docs/format.md, "serde").
SERDE_INLINE_BYTES = 1 << 20

TYPESTRS = {"|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f4", "<f8", "<c8", "<c16"}


class Serde:
    """A plain value and the Rust type it is read as: `Serde(7, "u64")`,
    `Serde((2, 3.0), ("usize", "f64"))`, `Serde({"a": [1, None]}, "any")`."""

    def __init__(self, value, schema=None):
        self.value = value
        self.schema = pc.schema_of(value) if schema is None else schema


class Raw:
    """A `serde` value as postcard bytes, for a side that names no schema for it: what a call
    without `returns` gives back, and what a served handler without a schema gets. Sent on,
    it travels as the same value."""

    def __init__(self, data):
        self.data = bytes(data)

    def __bytes__(self):
        return self.data

    def __eq__(self, other):
        return isinstance(other, Raw) and other.data == self.data

    def __repr__(self):
        return f"shm.Raw({self.data!r})"

    def read(self, schema):
        """The value, read as `schema`."""
        reader = pc.Reader(self.data)
        out = pc.decode(reader, schema)
        reader.end(f"a {schema!r}")
        return out


class Frame:
    """A simple frame (`shm_codec::SimpleFrame`): a 2-D array of one dtype, one name per column
    and the row labels, a `range` (the default, `range(nrows)`) or a list of strings."""

    def __init__(self, array, columns, index=None):
        if array.ndim != 2:
            raise ValueError(f"a frame's array has 2 axes, not {array.ndim}")
        if len(columns) != array.shape[1]:
            raise ValueError(f"{len(columns)} column names for {array.shape[1]} columns")
        index = range(array.shape[0]) if index is None else index
        if len(index) != array.shape[0]:
            raise ValueError(f"{len(index)} row labels for {array.shape[0]} rows")
        self.array, self.columns, self.index = array, list(columns), index

    def __repr__(self):
        return f"shm.Frame({self.array.shape[0]} rows, columns={self.columns!r})"


def block_of(a):
    """The shm block an array lies in, if it lies in one: `Block` or `BlockMut`."""
    base = a.base
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, (Block, BlockMut)) else None


def _array_meta(typestr, shape, strides, origin):
    return pc.encode(typestr, "str") + pc.encode(list(shape), ["u64"]) + pc.encode(list(strides), ["i64"]) + pc.varint(origin)


def _array(a):
    if a.dtype.str not in TYPESTRS:
        raise TypeError(f"arrays of {a.dtype} do not travel; shm has {sorted(TYPESTRS)}")
    block = block_of(a)
    if block is not None:
        # In a block already: sent as that block, with this view's own origin and strides.
        origin = a.ctypes.data - block.address()
        if isinstance(block, BlockMut):
            a.flags.writeable = False
        return "ndarray", _array_meta(a.dtype.str, a.shape, a.strides, origin), b"", [block]
    if a.flags.c_contiguous:
        data = a
    elif a.flags.f_contiguous:
        data = a.T
    else:
        a = data = np.ascontiguousarray(a)
    meta = _array_meta(a.dtype.str, a.shape, a.strides, 0)
    raw = memoryview(data.reshape(-1) if data.ndim else data.reshape(1)).cast("B")
    if a.nbytes <= INLINE_BYTES:
        return "ndarray", meta, bytes(raw), []
    return "ndarray", meta, b"", [raw]


def _frame(frame):
    _, meta, inline, blocks = _array(frame.array)
    meta += pc.encode(frame.columns, ["str"])
    if isinstance(frame.index, range):
        meta += pc.varint(0) + pc.zigzag(frame.index.start) + pc.zigzag(frame.index.step)
    else:
        meta += pc.varint(1) + pc.encode(frame.index, ["str"])
    return "frame", meta, inline, blocks


def _serde(data):
    if len(data) > SERDE_INLINE_BYTES:
        return "serde", b"", b"", [data]
    return "serde", b"", data, []


def is_arrow(value):
    """A pyarrow RecordBatch or Table (or anything exporting a batch through the Arrow PyCapsule
    interface)."""
    return hasattr(value, "__arrow_c_array__") or (hasattr(value, "__arrow_c_stream__") and hasattr(value, "combine_chunks"))


def has_array(value):
    return isinstance(value, (np.ndarray, Frame)) or is_arrow(value) or (isinstance(value, tuple) and any(map(has_array, value)))


def _arrow(value, native):
    if not hasattr(value, "__arrow_c_array__"):
        # A table: one batch of its columns, each in one chunk.
        import pyarrow as pa

        value = pa.RecordBatch.from_arrays([c.combine_chunks() for c in value.columns], schema=value.schema)
    return native.encode_arrow(value)


def encode(value, native):
    """(codec, meta, inline, blocks) of a value: an array, a `Serde`, None (no arguments), a
    tuple with arrays in it (the `tuple` codec, one member per element), or a plain value sent
    with its inferred schema. Each of `blocks` is a `Block`/`BlockMut` to send as it is or a
    buffer to copy into shared memory."""
    if isinstance(value, np.ndarray):
        return _array(value)
    if isinstance(value, Frame):
        return _frame(value)
    if is_arrow(value):
        return _arrow(value, native)
    if isinstance(value, Serde):
        return _serde(pc.encode(value.value, value.schema))
    if isinstance(value, Raw):
        return _serde(value.data)
    if value is None:
        return "tuple", pc.varint(0), b"", []
    if isinstance(value, tuple) and has_array(value):
        members, blocks = [], []
        for member in value:
            codec, meta, inline, data = encode(member, native)
            members.append(pc.encode(codec, "str") + pc.encode(meta, "bytes") + pc.encode(inline, "bytes") + pc.varint(len(data)))
            blocks.extend(data)
        return "tuple", pc.varint(len(members)) + b"".join(members), b"", blocks
    return _serde(pc.encode(value, pc.schema_of(value)))


def _array_from(reader, inline, blocks):
    """The array whose metadata `reader` is at, over the payload's data."""
    typestr = pc.decode(reader, "str")
    shape = pc.decode(reader, ["u64"])
    strides = pc.decode(reader, ["i64"])
    origin = reader.varint()
    if typestr not in TYPESTRS:
        raise Error(f"an array of typestr {typestr!r}")
    if len(strides) != len(shape):
        raise Error(f"{len(strides)} strides for {len(shape)} axes")
    if len(blocks) > 1:
        raise Error(f"an array in {len(blocks)} blocks")
    buffer = blocks[0] if blocks else inline
    # numpy checks that every element lies inside the buffer.
    try:
        a = np.ndarray(tuple(shape), dtype=np.dtype(typestr), buffer=buffer, offset=origin, strides=tuple(strides))
    except (ValueError, TypeError) as e:
        raise Error(f"an array that does not fit its data: {e}") from None
    a.flags.writeable = False
    if typestr == "|b1" and a.size and a.view(np.uint8).max() > 1:
        raise Error("a bool array holds bytes other than 0 and 1")
    return a


def _frame_from(meta, inline, blocks):
    reader = pc.Reader(meta)
    array = _array_from(reader, inline, blocks)
    columns = pc.decode(reader, ["str"])
    tag = reader.varint()
    if tag == 0:
        start, step = reader.zigzag(), reader.zigzag()
        index = range(start, start + step * array.shape[0], step) if step else [start] * array.shape[0]
    elif tag == 1:
        index = pc.decode(reader, ["str"])
    else:
        raise Error(f"a frame index of variant {tag}")
    reader.end("a frame's metadata")
    try:
        return Frame(array, columns, index)
    except ValueError as e:
        raise Error(f"a frame that does not add up: {e}") from None


def _members(meta, blocks):
    r = pc.Reader(meta)
    members, used = [], 0
    for _ in range(r.varint()):
        codec = pc.decode(r, "str")
        member_meta = pc.decode(r, "bytes")
        inline = pc.decode(r, "bytes")
        count = r.varint()
        if used + count > len(blocks):
            raise Error(f"tuple members name {used + count} blocks; the payload has {len(blocks)}")
        members.append((codec, member_meta, inline, blocks[used : used + count]))
        used += count
    r.end("a tuple's metadata")
    if used != len(blocks):
        raise Error(f"tuple members name {used} blocks; the payload has {len(blocks)}")
    return members


def decode(codec, meta, inline, blocks, schema, native, depth=0):
    """The value of a payload: an array for `ndarray` (a read-only view of its block), a
    `Frame` for `frame` (over the block likewise), a pyarrow RecordBatch for `arrow-columns` (over the blocks' memory), a value read as `schema`
    for `serde` (a `Raw` if no schema is given), a tuple for `tuple` (with a tuple of schemas,
    one per member, None for arrays and batches)."""
    if codec == "ndarray":
        reader = pc.Reader(meta)
        out = _array_from(reader, inline, blocks)
        reader.end("an array's metadata")
        return out
    if codec == "frame":
        return _frame_from(meta, inline, blocks)
    if codec == "arrow-columns":
        return native.decode_arrow((codec, meta, inline, blocks))
    if codec == "serde":
        if meta:
            raise Error(f"a serde payload with {len(meta)} bytes of metadata")
        if len(blocks) > 1:
            raise Error(f"a serde value in {len(blocks)} blocks")
        value = Raw(blocks[0] if blocks else inline)
        return value if schema is None else value.read(schema)
    if codec == "tuple":
        if depth >= pc.MAX_DEPTH:
            raise Error(f"tuples nested deeper than {pc.MAX_DEPTH}")
        members = _members(meta, blocks)
        if not members:
            return None
        schemas = schema if isinstance(schema, tuple) else (schema,) * len(members)
        if len(schemas) != len(members):
            raise Error(f"a tuple of {len(members)} values read with {len(schemas)} schemas")
        return tuple(decode(*member, s, native, depth + 1) for member, s in zip(members, schemas))
    raise Error(f"a payload of codec {codec!r}, which this module does not read")
