"""Payloads a lying worker could send, read by the Python half: each is a typed `shm.Error`,
never a crash, a hang or a view outside the data."""

import numpy as np
import pytest

import shm
from shm import _payload
from shm import _postcard as pc


def array_meta(typestr="<f8", shape=(4,), strides=(8,), origin=0):
    return pc.encode(typestr, "str") + pc.encode(list(shape), ["u64"]) + pc.encode(list(strides), ["i64"]) + pc.varint(origin)


def decode(codec, meta, inline=b"", blocks=(), schema=None):
    return _payload.decode(codec, meta, inline, list(blocks), schema, None)


DATA = bytes(range(32))


@pytest.mark.parametrize(
    "meta",
    [
        array_meta(shape=(5,)),  # one element past the end
        array_meta(origin=8),  # shifted past the end
        array_meta(strides=(-8,)),  # backwards from the first byte
        array_meta(shape=(2**40,)),  # a huge count
        array_meta(shape=(2**32, 2**32), strides=(0, 0)),  # a product that overflows
        array_meta(strides=(8, 8)),  # strides for another rank
        array_meta(typestr="<f16"),  # a type shm has not
        array_meta(typestr="|O"),  # Python objects: pointers from a peer
        array_meta()[:-1],  # truncated
        array_meta() + b"\x00",  # trailing bytes
        b"\xff" * 11,  # a varint longer than 10 bytes
    ],
)
def test_arrays_that_do_not_fit_their_data_are_errors(meta):
    with pytest.raises(shm.Error):
        decode("ndarray", meta, DATA)


def test_bool_bytes_other_than_0_and_1_are_errors():
    with pytest.raises(shm.Error):
        decode("ndarray", array_meta("|b1", (4,), (1,)), b"\x00\x01\x02\x01")


def test_tuples_whose_members_miscount_their_blocks_are_errors():
    member = pc.encode("ndarray", "str") + pc.encode(array_meta(), "bytes") + pc.encode(b"", "bytes")
    for claimed, blocks in [(1, []), (0, [DATA]), (2**40, [DATA])]:
        meta = pc.varint(1) + member + pc.varint(claimed)
        with pytest.raises(shm.Error):
            decode("tuple", meta, blocks=blocks)


def test_tuples_nested_past_the_limit_are_errors():
    meta = pc.varint(0)
    for _ in range(pc.MAX_DEPTH + 1):
        meta = pc.varint(1) + pc.encode("tuple", "str") + pc.encode(meta, "bytes") + pc.encode(b"", "bytes") + pc.varint(0)
    with pytest.raises(shm.Error):
        decode("tuple", meta)


@pytest.mark.parametrize(
    "data",
    [
        b"\x06" + b"\x01\x06" * 100_000,  # nested lists, far past the limit
        b"\x08",  # no such variant
        b"\x04\x05ab",  # a string shorter than its length
        b"\x04\x02\xff\xfe",  # not UTF-8
        b"\x01\x02",  # a bool of 2
        b"\x07\x01\x06\x00\x00",  # a map keyed by a list
        b"\x06\xff\xff\xff\xff\x0f",  # a list that claims 4 billion items
    ],
)
def test_self_describing_values_a_peer_made_up_are_errors(data):
    with pytest.raises(shm.Error):
        decode("serde", b"", data, schema="any")


def test_unknown_codecs_are_errors():
    with pytest.raises(shm.Error):
        decode("pickle", b"", b"\x80\x04")


def test_an_honest_array_still_reads():
    a = decode("ndarray", array_meta(shape=(2, 2), strides=(-16, 8), origin=16), DATA)
    # Rows backwards from the second: [[16..24, 24..32], [0..8, 8..16]].
    np.testing.assert_array_equal(a, np.frombuffer(DATA, "<f8").reshape(2, 2)[::-1])
