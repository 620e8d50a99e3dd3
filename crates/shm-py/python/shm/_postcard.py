"""postcard, the encoding of every message and of plain values (docs/format.md, "postcard, the
encoding of every message"), driven by a schema that names the Rust type a value is read as."""

import struct

import numpy as np

from ._shm import Error

UNSIGNED = ("u8", "u16", "u32", "u64", "usize")
SIGNED = ("i8", "i16", "i32", "i64", "isize")


def varint(n):
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


def zigzag(n):
    return varint((n << 1) ^ (n >> 63))


class Reader:
    """Reads postcard from bytes, refusing to read past their end."""

    def __init__(self, data):
        self.data, self.pos = memoryview(data).cast("B"), 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Error(f"{len(self.data)} bytes end inside a value (at byte {self.pos}, {n} more wanted)")
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

    def end(self, what):
        if self.pos != len(self.data):
            raise Error(f"{len(self.data) - self.pos} bytes left after {what}")


def encode(value, schema):
    """The postcard bytes of `value` read as `schema`."""
    if isinstance(schema, tuple):
        if len(value) != len(schema):
            raise ValueError(f"{len(value)} values for a tuple of {len(schema)}")
        return b"".join(encode(v, s) for v, s in zip(value, schema))
    if isinstance(schema, list):
        (inner,) = schema
        return varint(len(value)) + b"".join(encode(v, inner) for v in value)
    if isinstance(schema, dict):
        ((key, val),) = schema.items()
        return varint(len(value)) + b"".join(encode(k, key) + encode(v, val) for k, v in value.items())
    if schema in UNSIGNED:
        return varint(int(value))
    if schema in SIGNED:
        return zigzag(int(value))
    if schema == "f64":
        return struct.pack("<d", value)
    if schema == "f32":
        return struct.pack("<f", value)
    if schema == "bool":
        return b"\x01" if value else b"\x00"
    if schema == "str":
        data = value.encode()
        return varint(len(data)) + data
    if schema == "bytes":
        return varint(len(value)) + bytes(value)
    if schema == "unit":
        return b""
    if schema == "any":
        return encode_any(value)
    if isinstance(schema, Option):
        return b"\x00" if value is None else b"\x01" + encode(value, schema.inner)
    raise ValueError(f"unknown schema {schema!r}")


def decode(reader, schema):
    """The value `schema` describes, read from `reader`."""
    if isinstance(schema, tuple):
        return tuple(decode(reader, s) for s in schema)
    if isinstance(schema, list):
        (inner,) = schema
        return [decode(reader, inner) for _ in range(reader.varint())]
    if isinstance(schema, dict):
        ((key, val),) = schema.items()
        return {decode(reader, key): decode(reader, val) for _ in range(reader.varint())}
    if schema in UNSIGNED:
        return reader.varint()
    if schema in SIGNED:
        return reader.zigzag()
    if schema == "f64":
        return struct.unpack("<d", reader.take(8))[0]
    if schema == "f32":
        return struct.unpack("<f", reader.take(4))[0]
    if schema == "bool":
        return _bool(reader)
    if schema == "str":
        return _str(reader)
    if schema == "bytes":
        return reader.take(reader.varint())
    if schema == "unit":
        return None
    if schema == "any":
        return decode_any(reader)
    if isinstance(schema, Option):
        return decode(reader, schema.inner) if _bool(reader) else None
    raise ValueError(f"unknown schema {schema!r}")


def _bool(reader):
    (byte,) = reader.take(1)
    if byte > 1:
        raise Error(f"a bool byte of {byte}")
    return bool(byte)


def _str(reader):
    data = reader.take(reader.varint())
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise Error(f"a string that is not UTF-8: {e}") from None


class Option:
    """The schema of a Rust `Option<T>`: `Option("u64")`."""

    def __init__(self, inner):
        self.inner = inner

    def __repr__(self):
        return f"Option({self.inner!r})"


# --- "any": shm_codec::Value, a self-describing value -------------------------------------------
# An enum, so a variant index and then its content (docs/format.md, "`serde`: plain values").
UNIT, BOOL, INT, FLOAT, STR, BYTES, LIST, MAP = range(8)

# Nesting deeper than this is refused on both sides, so that a hostile value cannot exhaust the
# stack.
MAX_DEPTH = 64


def encode_any(value, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError(f"a value nested deeper than {MAX_DEPTH}")
    if value is None:
        return varint(UNIT)
    if isinstance(value, (bool, np.bool_)):
        return varint(BOOL) + (b"\x01" if value else b"\x00")
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if not -(2**63) <= value < 2**63:
            raise OverflowError(f"{value} does not fit an i64")
        return varint(INT) + zigzag(value)
    if isinstance(value, (float, np.floating)):
        return varint(FLOAT) + struct.pack("<d", value)
    if isinstance(value, str):
        return varint(STR) + encode(value, "str")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return varint(BYTES) + encode(bytes(value), "bytes")
    if isinstance(value, (list, tuple)):
        return varint(LIST) + varint(len(value)) + b"".join(encode_any(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return (
            varint(MAP)
            + varint(len(value))
            + b"".join(encode_any(k, depth + 1) + encode_any(v, depth + 1) for k, v in value.items())
        )
    raise TypeError(f"a {type(value).__name__} is not a plain value")


def decode_any(reader, depth=0):
    if depth > MAX_DEPTH:
        raise Error(f"a value nested deeper than {MAX_DEPTH}")
    tag = reader.varint()
    if tag == UNIT:
        return None
    if tag == BOOL:
        return _bool(reader)
    if tag == INT:
        return reader.zigzag()
    if tag == FLOAT:
        return struct.unpack("<d", reader.take(8))[0]
    if tag == STR:
        return _str(reader)
    if tag == BYTES:
        return reader.take(reader.varint())
    if tag == LIST:
        return [decode_any(reader, depth + 1) for _ in range(reader.varint())]
    if tag == MAP:
        out = {}
        for _ in range(reader.varint()):
            key = decode_any(reader, depth + 1)
            if isinstance(key, (list, dict)):
                raise Error("a map key that is a list or a map, which Python cannot hash")
            out[key] = decode_any(reader, depth + 1)
        return out
    raise Error(f"a value of variant {tag}; there are {MAP + 1}")


def schema_of(value):
    """The schema a plain value is sent as when the caller names none: exact types where the
    value has one shape, "any" (shm_codec::Value) for dicts and lists of mixed kinds."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "i64"
    if isinstance(value, (float, np.floating)):
        return "f64"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if value is None:
        return "unit"
    if isinstance(value, tuple):
        return tuple(schema_of(v) for v in value)
    if isinstance(value, list) and value:
        kinds = {repr(schema_of(v)) for v in value}
        return [schema_of(value[0])] if len(kinds) == 1 and "'any'" not in kinds.pop() else "any"
    if isinstance(value, (list, dict)):
        return "any"
    raise TypeError(f"no schema for a {type(value).__name__}; pass shm.Serde(value, schema)")
