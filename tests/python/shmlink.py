"""Segment links (docs/format.md, "Segment links"), with the standard library only: receive
the descriptors of another process's segments and map them, and send our own.

A link is one end of a Unix SOCK_SEQPACKET socket pair. Each message is a tag byte and a
segment name: "+NAME" with one descriptor (SCM_RIGHTS) of a memfd sealed against shrinking
and growing, or "-NAME" without one (the sender let the segment go). Nothing is opened by name.
"""

import fcntl
import mmap
import os
import socket

# The segment's length can never change; unless it is shared (the channel), only its creator
# writes it.
LENGTH_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
F_SEAL_FUTURE_WRITE = 0x10  # not in Python's fcntl module before 3.12
DATA_SEALS = LENGTH_SEALS | F_SEAL_FUTURE_WRITE


class Link:
    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        self.segments = {}  # name -> mmap (or b"" for an empty segment)
        self.sent = set()

    @classmethod
    def from_env(cls, variable):
        return cls(int(os.environ[variable]))

    def _receive(self, block):
        """Takes one message; False when none waits (and `block` is false)."""
        self.sock.settimeout(10 if block else 0)
        try:
            message, fds, flags, _ = socket.recv_fds(self.sock, 256, 1)
        except (BlockingIOError, TimeoutError):
            return False
        if not message and not fds:
            raise EOFError("the peer closed the link")
        tag, name = message[:1], message[1:].decode()
        if tag == b"+" and len(fds) == 1:
            self.segments[name] = self._map(fds[0], name)
        elif tag == b"-" and not fds:
            self.segments.pop(name, None)
        else:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"malformed link message {message!r}")
        return True

    @staticmethod
    def _map(fd, name):
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
                raise ValueError(f"{name}: not sealed against shrinking and growing")
            size = os.fstat(fd).st_size
            if size == 0:
                return b""
            writable = not seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            return mmap.mmap(fd, size, prot=prot)
        finally:
            os.close(fd)

    def segment(self, name, wait=True):
        """The mapping of the peer's segment `name` (with its leading slash)."""
        while name not in self.segments:
            if not self._receive(block=False) and not (wait and self._receive(block=True)):
                raise LookupError(f"no descriptor was received for {name}")
        return self.segments[name]

    def create(self, name, size, shared=False):
        """A new sealed memfd of `size` bytes named `name`, mapped read-write: (fd, mmap)."""
        fd = os.memfd_create(name.lstrip("/"), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        if size:
            os.posix_fallocate(fd, 0, size)
        mapping = mmap.mmap(fd, size) if size else b""
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, LENGTH_SEALS if shared else DATA_SEALS)
        return fd, mapping

    def offer(self, name, fd):
        """Sends the descriptor of our segment `name`, once."""
        if name not in self.sent:
            socket.send_fds(self.sock, [b"+" + name.encode()], [fd])
            self.sent.add(name)
