"""A worker written from docs/format.md alone ("The channel: parent and worker"), in Python with
the standard library only: it receives the channel's descriptor on the link whose number is in
SHM_TRANSPORT_LINK (shmlink.py), maps the block SHM_TRANSPORT_CHANNEL names, picks a session
id, says hello, and serves these methods on serde arguments until told to shut down:

  echo     u64 -> u64
  add      (u64, u64) -> u64
  shout    String -> String (upper case)
  spill    u64 n -> String of n "z"s: a reply too large for a ring slot, sent as a Spilled frame
           in a lent block

Anything else gets an UnknownMethod error reply. This worker never reads the release ring
towards itself: the blocks of its spilled replies never come back to it, and it reuses them in
turn (a parent that has read a spilled frame is done with its block). That makes it the peer the
parent must bound: one that never drains what is returned to it. The parent's tests start it with
`Worker::spawn(WorkerConfig::new(python).args([this file]))`.
"""

import ctypes
import os
import secrets
import struct
import sys
import time

from shmlink import Link

# --- postcard (format.md, "postcard, the encoding of every message") -------------------------


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(text):
    data = text.encode()
    return varint(len(data)) + data


def blob(data):
    return varint(len(data)) + bytes(data)


class Reader:
    def __init__(self, data):
        self.data, self.pos = bytes(data), 0

    def byte(self):
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

    def bytes(self):
        n = self.varint()
        out = self.data[self.pos:self.pos + n]
        if len(out) != n:
            raise ValueError("truncated")
        self.pos += n
        return out

    def string(self):
        return self.bytes().decode()


def read_ref(r):
    return {"name": r.string(), "size": r.varint(), "offset": r.varint(), "content_size": r.varint()}


# --- the channel (format.md, "Layout", "Rings", "Bells") --------------------------------------

SLOTS, SLOT_LEN, SLOT_COUNT = 1024, 4096, 64
TO_WORKER, TO_PARENT = 0, 1
FUTEX_WAKE = 1
SYS_FUTEX = 202  # x86-64
libc = ctypes.CDLL(None, use_errno=True)


class Channel:
    def __init__(self, ref, link):
        # The parent shares the channel's segment for both sides to write: it is sealed
        # against any change of length, not against writes, and shmlink maps it read-write.
        self.map = link.segment(ref["name"])
        self.base = ref["offset"]
        if self.base % 64 or self.base + ref["size"] > len(self.map):
            raise SystemExit(f"channel reference {ref} outside its segment")
        # Ring positions as native u64 words (little-endian here, as the format says).
        self.words = memoryview(self.map)[: len(self.map) // 8 * 8].cast("Q")
        magic, version, slot_len, slots = struct.unpack_from("<QIII", self.map, self.base)
        if magic != 0x73686D2D6368616E or version != 4 or (slot_len, slots) != (SLOT_LEN, SLOT_COUNT):
            raise SystemExit(f"not a channel this worker speaks: {magic:#x} v{version}")

    def u64(self, at):
        return self.words[(self.base + at) // 8]

    def set_u64(self, at, value):
        # One aligned 8-byte store: struct.pack_into writes byte by byte, and the parent could
        # read a half-written position, which looks like a jammed ring (format.md, "Rings").
        self.words[(self.base + at) // 8] = value

    def ring_bell(self, side):
        """Adds 1 to the side's seq and wakes its sleepers. Python has no memory fence, so
        this worker cannot trust a sleeper count it reads right after publishing: it wakes
        whether the count says anyone sleeps or not (a system call per frame, which a worker
        this slow can afford)."""
        bell = self.base + 64 + 64 * side
        (seq,) = struct.unpack_from("<I", self.map, bell)
        struct.pack_into("<I", self.map, bell, (seq + 1) & 0xFFFFFFFF)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.map, bell))
        libc.syscall(SYS_FUTEX, ctypes.c_void_p(address), FUTEX_WAKE, 0x7FFFFFFF, None)

    def push(self, frame):
        """Appends a frame to the ring to the parent (waiting while it is full)."""
        head_at, tail_at = 384, 448
        while True:
            head, tail = self.u64(head_at), self.u64(tail_at)
            if tail - head < SLOT_COUNT:
                break
            time.sleep(0.0001)
        slot = SLOTS + (TO_PARENT * SLOT_COUNT + tail % SLOT_COUNT) * SLOT_LEN
        struct.pack_into("<I", self.map, self.base + slot, len(frame))
        self.map[self.base + slot + 4:self.base + slot + 4 + len(frame)] = frame
        self.set_u64(tail_at, tail + 1)
        self.ring_bell(0)

    def pop(self):
        """The next frame from the parent, or None."""
        head_at, tail_at = 192, 256
        head, tail = self.u64(head_at), self.u64(tail_at)
        if head == tail:
            return None
        if tail - head > SLOT_COUNT:
            raise SystemExit(f"broken ring: head {head}, tail {tail}")
        slot = SLOTS + (TO_WORKER * SLOT_COUNT + head % SLOT_COUNT) * SLOT_LEN
        (length,) = struct.unpack_from("<I", self.map, self.base + slot)
        frame = bytes(self.map[self.base + slot + 4:self.base + slot + 4 + length])
        self.set_u64(head_at, head + 1)
        if struct.unpack_from("<I", self.map, self.base + 320)[0]:
            self.ring_bell(0)
        return frame


# --- a session of our own (format.md, "Segments") ---------------------------------------------

def take_session():
    """Eight random hex digits: the prefix of the names of this worker's segments (it makes
    none: every value it sends is inline). No file marks a session."""
    return secrets.token_hex(4)


# --- payloads and frames ----------------------------------------------------------------------

def serde_payload(value_bytes):
    """A `serde` payload with its value inline: version 2, codec, empty meta, no buffers."""
    return varint(2) + string("serde") + blob(b"") + varint(0) + blob(value_bytes)


def read_payload(r):
    payload = {"version": r.varint(), "codec": r.string(), "meta": r.bytes(),
               "buffers": [read_ref(r) for _ in range(r.varint())], "inline": r.bytes()}
    if payload["version"] != 2:
        raise ValueError(f"payload version {payload['version']}")
    return payload


def handle(method, payload):
    """Runs a method; returns the reply's value bytes, or raises LookupError."""
    if payload["codec"] != "serde" or payload["buffers"]:
        raise ValueError("this worker takes inline serde arguments only")
    r = Reader(payload["inline"])
    if method == "echo":
        return varint(r.varint())
    if method == "add":
        return varint(r.varint() + r.varint())
    if method == "shout":
        return string(r.string().upper())
    if method == "spill":
        return string("z" * r.varint())
    raise LookupError(method)


class Spills:
    """Blocks for replies too large for a ring slot: slots of one sealed segment, sent once on
    the link, used in turn. A block is reused 128 frames later, when the parent has long read
    it: it reads frames in order, and at most 64 wait in the ring."""

    SLOT, COUNT = 64 << 10, 128

    def __init__(self, link, session):
        self.name = f"/shm-{session}-{secrets.token_hex(8)}"
        self.fd, self.map = link.create(self.name, self.SLOT * self.COUNT)
        link.offer(self.name, self.fd)
        self.next = 0

    def spill(self, frame, loan):
        """The Spilled frame (variant 4) that points to `frame`, written into the next block."""
        if len(frame) > self.SLOT:
            raise ValueError(f"a frame of {len(frame)} bytes is too large to spill here")
        offset = (self.next % self.COUNT) * self.SLOT
        self.next += 1
        self.map[offset:offset + len(frame)] = frame
        ref = string(self.name) + varint(self.SLOT) + varint(offset) + varint(len(frame))
        return varint(4) + ref + varint(loan)


def reply(call_id, value=None, error=None):
    frame = varint(2) + varint(call_id)
    if error is None:
        frame += varint(0) + serde_payload(value)
    else:
        method, kind, message = error  # RemoteError { method, kind, message }
        frame += varint(1) + string(method) + varint(kind) + string(message)
    return frame + varint(0)  # no loans: nothing of ours in shared memory


def main():
    r = Reader(bytes.fromhex(os.environ["SHM_TRANSPORT_CHANNEL"]))
    link = Link.from_env("SHM_TRANSPORT_LINK")
    channel = Channel(read_ref(r), link)
    session = take_session()
    spills = Spills(link, session)
    lent = 0
    channel.push(varint(0) + varint(4) + varint(os.getpid()) + string(session))
    idle_since = time.monotonic()
    while True:
        frame = channel.pop()
        if frame is None:
            # Spin a little, then nap: a worker that waits long sleeps, as format.md allows.
            time.sleep(0 if time.monotonic() - idle_since < 0.001 else 0.0002)
            continue
        idle_since = time.monotonic()
        f = Reader(frame)
        variant = f.varint()
        if variant == 3:  # Shutdown
            return
        if variant != 1:  # only calls come this way
            continue
        call_id, method = f.varint(), f.string()
        args = read_payload(f)
        loans = [f.varint() for _ in range(f.varint())]
        if loans:
            raise SystemExit("this worker was lent blocks it does not read")
        try:
            frame = reply(call_id, value=handle(method, args))
        except LookupError:
            frame = reply(call_id, error=(method, 2, f"no handler named {method!r}"))
        if len(frame) > SLOT_LEN - 4:
            lent += 1
            frame = spills.spill(frame, lent)
        channel.push(frame)


if __name__ == "__main__":
    main()
