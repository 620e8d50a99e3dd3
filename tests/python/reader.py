"""A reader of shm payloads written from docs/format.md alone: numpy and pyarrow, no project code.

    reader.py MANIFEST

The descriptors of the payloads' segments come on the link whose descriptor number is in
SHM_TEST_LINK (shmlink.py, docs/format.md "Segment links").

MANIFEST holds one JSON object per line: {"kind": ..., "payload": HEX, "expect": ...}, where
HEX is a payload's postcard bytes and "expect" what it must decode to:

  kind "array":  {"typestr", "shape", "values"}: the elements flattened in C order (complex
                 numbers as [re, im], bools as true/false)
  kind "frame":  {"typestr", "shape", "values", "columns", "index"}: the same for the frame's
                 array, its column names and its row labels
  kind "tuple":  a list with one {"kind", "expect"} per member
  kind "serde":  {"type": "bytes" | "string" | "string-u64", "value": ...}
  kind "arrow":  {"ipc": HEX}: the postcard ShmRef of an Arrow IPC stream block holding the
                 same batch, read by pyarrow as the reference

Prints one line per case and exits non-zero if any case failed.
"""

import json
import sys

import numpy as np
import pyarrow as pa

from shmlink import Link


# --- postcard (format.md, "postcard, the encoding of every message") -------------------------

class Postcard:
    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def byte(self):
        if self.pos >= len(self.data):
            raise ValueError("truncated message")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self):
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift > 70:
                raise ValueError("varint too long")

    def zigzag(self):
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def raw(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("truncated message")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def bytes(self):
        return self.raw(self.varint())

    def string(self):
        return self.bytes().decode("utf-8")

    def seq(self, read):
        return [read() for _ in range(self.varint())]

    def option(self, read):
        tag = self.byte()
        if tag == 0:
            return None
        if tag == 1:
            return read()
        raise ValueError(f"option tag {tag}")

    def end(self):
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} trailing bytes")


# --- segments and blocks (format.md, "Segments", "ShmRef", "Python: attaching …") --------------

# The segments of the Rust test, whose descriptors come on the link it passed (shmlink.py).
LINK = None


def read_ref(p):
    return {"name": p.string(), "size": p.varint(), "offset": p.varint(), "content_size": p.varint()}


def content(ref):
    """The block's content as a memoryview of the mapped segment, after the reader's checks."""
    segment = LINK.segment(ref["name"])
    if ref["offset"] % 64:
        raise ValueError(f"offset {ref['offset']} is not a multiple of 64")
    if ref["offset"] + ref["size"] > len(segment):
        raise ValueError(f"block {ref} outside a segment of {len(segment)} bytes")
    if ref["content_size"] > ref["size"]:
        raise ValueError(f"content larger than the block: {ref}")
    return memoryview(segment)[ref["offset"]:ref["offset"] + ref["content_size"]]


def read_payload(data):
    p = Postcard(data)
    version = p.varint()
    if version != 2:
        raise ValueError(f"format version {version}")
    payload = {
        "codec": p.string(),
        "meta": p.bytes(),
        "buffers": p.seq(lambda: read_ref(p)),
        "inline": p.bytes(),
    }
    p.end()
    return payload


def data_of(payload):
    """One buffer's content, or the inline bytes (format.md, `ndarray`)."""
    buffers = payload["buffers"]
    if len(buffers) == 1:
        return content(buffers[0])
    if len(buffers) == 0:
        return memoryview(payload["inline"])
    raise ValueError(f"{len(buffers)} buffers for one array")


# --- ndarray and frame ------------------------------------------------------------------------

def read_array_meta(p):
    return {
        "typestr": p.string(),
        "shape": p.seq(p.varint),
        "strides": p.seq(p.zigzag),
        "origin": p.varint(),
    }


def view_array(meta, data):
    dtype = np.dtype(meta["typestr"])
    shape, strides, origin = meta["shape"], list(meta["strides"]), meta["origin"]
    if len(strides) != len(shape):
        raise ValueError("strides and shape differ in length")
    # A stride along an axis of length 0 or 1 is never used and may hold anything.
    strides = [0 if n <= 1 else s for n, s in zip(shape, strides)]
    if any(s % dtype.itemsize for s in strides):
        raise ValueError(f"strides {strides} not multiples of {dtype.itemsize}")
    if origin % dtype.alignment:
        raise ValueError(f"origin {origin} not aligned")
    if 0 in shape:
        return np.zeros(shape, dtype=dtype)
    low = origin + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    high = origin + dtype.itemsize + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0)
    if low < 0 or high > len(data):
        raise ValueError(f"elements span {low}..{high} of {len(data)} bytes")
    array = np.ndarray(shape, dtype=dtype, buffer=data, offset=origin, strides=strides)
    if dtype == np.bool_ and not np.all(array.view(np.uint8) <= 1):
        raise ValueError("bool bytes other than 0 and 1")
    return array


def read_ndarray(payload):
    p = Postcard(payload["meta"])
    meta = read_array_meta(p)
    p.end()
    return view_array(meta, data_of(payload))


def read_frame(payload):
    p = Postcard(payload["meta"])
    meta = read_array_meta(p)
    columns = p.seq(p.string)
    tag = p.varint()
    array = view_array(meta, data_of(payload))
    if tag == 0:
        start, step = p.zigzag(), p.zigzag()
        index = [start + r * step for r in range(array.shape[0])]
    elif tag == 1:
        index = p.seq(p.string)
    else:
        raise ValueError(f"index variant {tag}")
    p.end()
    return {"array": array, "columns": columns, "index": index}


# --- tuple and serde --------------------------------------------------------------------------

def read_tuple(payload):
    p = Postcard(payload["meta"])
    members, used = [], 0
    for _ in range(p.varint()):
        codec, meta, inline, count = p.string(), p.bytes(), p.bytes(), p.varint()
        buffers = payload["buffers"][used:used + count]
        if len(buffers) != count:
            raise ValueError("members name more buffers than the tuple has")
        used += count
        members.append({"codec": codec, "meta": meta, "buffers": buffers, "inline": inline})
    p.end()
    if used != len(payload["buffers"]):
        raise ValueError(f"members use {used} of {len(payload['buffers'])} buffers")
    return members


def read_serde(payload, rust_type):
    p = Postcard(bytes(data_of(payload)))
    if rust_type == "bytes":
        value = list(p.bytes())
    elif rust_type == "string":
        value = p.string()
    elif rust_type == "string-u64":
        value = [p.string(), p.varint()]
    else:
        raise ValueError(f"unknown serde type {rust_type}")
    p.end()
    return value


# --- arrow-columns ----------------------------------------------------------------------------

def read_bufref(p):
    return {"block": p.varint(), "offset": p.varint(), "len": p.varint()}


def read_node(p):
    node = {"len": p.varint(), "offset": p.varint()}
    node["nulls"] = p.option(lambda: {
        "bits": read_bufref(p), "bit_offset": p.varint(), "null_count": p.varint()})
    node["buffers"] = p.seq(lambda: read_bufref(p))
    node["children"] = p.seq(lambda: read_node(p))
    return node


def framed_schema(schema):
    """The schema flatbuffer with the IPC stream framing pyarrow wants (format.md)."""
    message = b"\xff\xff\xff\xff" + len(schema).to_bytes(4, "little", signed=True) + schema
    return message + b"\x00" * (-len(message) % 8)


def child_types(t):
    if pa.types.is_map(t):
        return [pa.struct([t.key_field, t.item_field])]
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t) or pa.types.is_fixed_size_list(t)):
        return [t.value_type]
    if pa.types.is_struct(t) or pa.types.is_union(t):
        return [t.field(i).type for i in range(t.num_fields)]
    if pa.types.is_dictionary(t):
        return [t.value_type]
    if pa.types.is_run_end_encoded(t):
        return [t.run_end_type, t.value_type]
    return []


class ArrowReader:
    def __init__(self, payload):
        self.payload = payload

    def buffer(self, r):
        buffers = self.payload["buffers"]
        if r["block"] >= len(buffers):
            raise ValueError(f"buffer in block {r['block']} of {len(buffers)}")
        block = content(buffers[r["block"]])
        if r["offset"] + r["len"] > len(block):
            raise ValueError(f"buffer {r} outside a block of {len(block)} bytes")
        return pa.py_buffer(block[r["offset"]:r["offset"] + r["len"]])

    def validity(self, node):
        """Our bitmap puts element i at bit_offset + i; pyarrow wants offset + i."""
        nulls = node["nulls"]
        if nulls is None:
            return None, 0
        raw = np.frombuffer(self.buffer(nulls["bits"]), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")
        start = nulls["bit_offset"]
        valid = bits[start:start + node["len"]]
        if len(valid) != node["len"]:
            raise ValueError("validity shorter than the array")
        moved = np.zeros(node["offset"] + node["len"], dtype=np.uint8)
        moved[node["offset"]:] = valid
        return pa.py_buffer(np.packbits(moved, bitorder="little").tobytes()), nulls["null_count"]

    def array(self, node, t):
        kinds = child_types(t)
        if len(kinds) != len(node["children"]):
            raise ValueError(f"{t} needs {len(kinds)} children, the node has {len(node['children'])}")
        children = [self.array(c, k) for c, k in zip(node["children"], kinds)]
        buffers = [self.buffer(b) for b in node["buffers"]]
        length, offset = node["len"], node["offset"]
        validity, null_count = self.validity(node)
        if pa.types.is_null(t):
            return pa.nulls(length)
        if pa.types.is_dictionary(t):
            keys = pa.Array.from_buffers(t.index_type, length, [validity] + buffers,
                                         null_count, offset)
            return pa.DictionaryArray.from_arrays(keys, children[0])
        if pa.types.is_run_end_encoded(t):
            whole = pa.RunEndEncodedArray.from_arrays(children[0], children[1], type=t)
            return whole.slice(offset, length)
        if pa.types.is_union(t):
            type_ids = np.frombuffer(buffers[0], dtype=np.int8)[offset:offset + length]
            codes = list(t.type_codes)
            names = [t.field(i).name for i in range(t.num_fields)]
            if t.mode == "sparse":
                sliced = [c.slice(offset, length) for c in children]
                return pa.UnionArray.from_sparse(pa.array(type_ids, pa.int8()), sliced, names, codes)
            value_offsets = np.frombuffer(buffers[1], dtype=np.int32)[offset:offset + length]
            return pa.UnionArray.from_dense(pa.array(type_ids, pa.int8()),
                                            pa.array(value_offsets, pa.int32()), children,
                                            names, codes)
        return pa.Array.from_buffers(t, length, [validity] + buffers, null_count, offset, children)

    def batch(self):
        p = Postcard(self.payload["meta"])
        schema_bytes, rows = p.bytes(), p.varint()
        nodes = p.seq(lambda: read_node(p))
        p.end()
        schema = pa.ipc.read_schema(pa.py_buffer(framed_schema(schema_bytes)))
        if len(nodes) != len(schema):
            raise ValueError(f"{len(nodes)} columns for {len(schema)} fields")
        columns = [self.array(n, f.type) for n, f in zip(nodes, schema)]
        for c in columns:
            c.validate(full=True)
        if any(len(c) != rows for c in columns):
            raise ValueError(f"columns of {[len(c) for c in columns]} rows, the batch has {rows}")
        return pa.RecordBatch.from_arrays(columns, schema=schema)


# --- checking against the manifest --------------------------------------------------------------

def flat_values(array):
    values = array.ravel(order="C").tolist() if array.ndim else [array.item()]
    if array.dtype.kind == "c":
        return [[v.real, v.imag] for v in values]
    return values


def check_array(array, expect):
    assert array.dtype == np.dtype(expect["typestr"]), (array.dtype, expect["typestr"])
    assert list(array.shape) == expect["shape"], (array.shape, expect["shape"])
    got = flat_values(array)
    assert got == expect["values"], (got[:8], expect["values"][:8])


def check(kind, payload, expect):
    if kind == "array":
        expect_codec(payload, "ndarray")
        check_array(read_ndarray(payload), expect)
    elif kind == "frame":
        expect_codec(payload, "frame")
        frame = read_frame(payload)
        check_array(frame["array"], expect)
        assert frame["columns"] == expect["columns"], frame["columns"]
        assert frame["index"] == expect["index"], frame["index"]
    elif kind == "tuple":
        expect_codec(payload, "tuple")
        members = read_tuple(payload)
        assert len(members) == len(expect), (len(members), len(expect))
        for member, want in zip(members, expect):
            check(want["kind"], member, want["expect"])
    elif kind == "serde":
        expect_codec(payload, "serde")
        value = read_serde(payload, expect["type"])
        assert value == expect["value"], (str(value)[:80], str(expect["value"])[:80])
    elif kind == "arrow":
        expect_codec(payload, "arrow-columns")
        batch = ArrowReader(payload).batch()
        p = Postcard(bytes.fromhex(expect["ipc"]))
        ref = read_ref(p)
        reference = pa.ipc.open_stream(pa.py_buffer(content(ref))).read_all()
        table = pa.Table.from_batches([batch])
        assert table.schema.equals(reference.schema), (table.schema, reference.schema)
        differing = [n for n in table.column_names if not table[n].equals(reference[n])]
        assert not differing, f"columns {differing} differ from the IPC stream's"
        del table, reference, batch
    else:
        raise AssertionError(f"unknown kind {kind}")


def expect_codec(payload, codec):
    if payload["codec"] != codec:
        raise AssertionError(f"codec {payload['codec']}, expected {codec}")


def main(path):
    global LINK
    LINK = Link.from_env("SHM_TEST_LINK")
    failures = 0
    with open(path) as manifest:
        cases = [json.loads(line) for line in manifest if line.strip()]
    for number, case in enumerate(cases):
        label = f"{number} {case['kind']} {case.get('label', '')}".strip()
        try:
            check(case["kind"], read_payload(bytes.fromhex(case["payload"])), case["expect"])
            print(f"ok {label}", flush=True)
        except Exception as error:  # every failure is reported, then the next case runs
            failures += 1
            print(f"FAILED {label}: {type(error).__name__}: {error}", flush=True)
    print(f"{len(cases) - failures} of {len(cases)} cases decoded and checked", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(sys.argv[1])
