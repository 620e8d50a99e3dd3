"""shm for Python: call worker processes with numpy arrays in shared memory, and serve Python
functions to a parent.

    import numpy as np, shm
    with shm.Worker(["path/to/worker"]) as w:
        total = w.call("sum", np.arange(1e8), returns="f64")   # one copy into shared memory
        a = w.empty(100_000_000)                                # or none: write in place
        a[:] = 1.0
        total = w.call("sum", a, returns="f64")                 # the worker reads this memory
        doubled = w.call("double", np.ones(10))                 # a read-only view of the
                                                                # worker's block, no copy
    with shm.WorkerPool(["path/to/worker"], 4) as pool:
        sums = pool.map("sum", arrays, progress=lambda done, total: print(done, total))

    # worker.py, started as shm.Worker([sys.executable, "worker.py"]) or by a Rust parent:
    shm.serve({"sum": lambda a: float(a.sum()), "scale": (scale, ("f64", "unit"))})

Values travel as docs/format.md describes them: numpy arrays as `ndarray` payloads, pyarrow
batches and tables as `arrow-columns`, tuples holding arrays or batches as `tuple`, everything else as postcard (`serde`), whose Rust type a caller names
with a schema: "u64", "i64", "f64", "f32", "bool", "str", "bytes", "unit", a tuple of schemas,
`[schema]` for a Vec, `{key: value}` for a map, `shm.Option(schema)`, or "any" for
`shm_codec::Value`, which describes itself (dicts, mixed lists).
"""

import concurrent.futures
import inspect
import itertools
import math

import numpy as np

from . import _payload
from ._postcard import Option
from ._payload import Frame, Raw, Serde, block_of
from ._shm import (  # noqa: F401
    BadArguments,
    Block,
    BlockMut,
    Error,
    OutOfSharedMemory,
    RawWorker,
    RemoteError,
    Timeout,
    WorkerDied,
    is_worker,
)
from ._shm import serve as _serve

__all__ = [
    "Worker",
    "WorkerPool",
    "serve",
    "is_worker",
    "Serde",
    "Raw",
    "Frame",
    "Option",
    "block_of",
    "Block",
    "BlockMut",
    "Error",
    "BadArguments",
    "OutOfSharedMemory",
    "RemoteError",
    "Timeout",
    "WorkerDied",
]


def _empty(alloc, shape, dtype, order):
    """A writable array over a fresh block from `alloc(nbytes)`."""
    dtype = np.dtype(dtype)
    if dtype.str not in _payload.TYPESTRS:
        raise TypeError(f"arrays of {dtype} do not travel; shm has {sorted(_payload.TYPESTRS)}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    block = alloc(nbytes)
    flat = np.frombuffer(block, dtype=dtype, count=math.prod(shape))
    return flat.reshape(shape, order=order)


class _Callee:
    def __init__(self, raw):
        self._raw = raw

    def call(self, method, value=None, timeout=None, returns=None):
        """Calls `method` with `value` and returns its result.

        `value`: a numpy array (copied once into shared memory, or sent as it is if it lies in
        a block from `empty`), a pyarrow RecordBatch or Table (its buffers copied once, unless
        they lie in shared memory already: a batch a worker returned is sent back as it is),
        a `Frame`, a `Serde`, a plain value (its schema inferred), a tuple with
        arrays in it (several arguments), or None for a handler without arguments.
        The result: an array for an `ndarray` reply (a read-only view of the worker's block),
        a pyarrow RecordBatch for an `arrow-columns` one (over the worker's blocks), a `Frame`
        for a `frame` one,
        the value read as `returns` (a schema) for a `serde` one (a `Raw` without a schema),
        a tuple for a `tuple` one, None for none. `timeout` is in seconds."""
        reply = self._raw.call(method, *_payload.encode(value, self._raw), timeout)
        return _payload.decode(*reply, returns, self._raw)

    def empty(self, shape, dtype=np.float64, order="C"):
        """A writable array in shared memory, sent to workers without a copy. It becomes
        read-only when it is first sent (the worker may still be reading it)."""
        return _empty(self._raw.alloc, shape, dtype, order)

    def zeros(self, shape, dtype=np.float64, order="C"):
        a = self.empty(shape, dtype, order)
        a.fill(0)
        return a

    def kill(self):
        """Kills the worker (every worker of a pool, which then refuses calls) at once."""
        self._raw.kill()

    def close(self):
        """Asks the workers to exit, and kills those that do not within their grace period."""
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Worker(_Callee):
    """A worker process: `argv` is its command line — a Rust binary that serves a `Router`,
    or a Python program that calls `shm.serve`. With `untrusted=True`, the worker's results
    are copied before they are read, so it cannot change them afterwards."""

    def __init__(self, argv, untrusted=False):
        super().__init__(RawWorker([str(a) for a in argv], untrusted))

    def restart(self):
        """Starts the worker again if it died."""
        self._raw.restart()

    @property
    def pid(self):
        return self._raw.pids()[0]


class WorkerPool(_Callee):
    """`n` workers started from `argv`, sharing one pool of shared memory. A call goes to the
    worker with the fewest calls in flight; a worker that dies fails only its own calls and is
    restarted in the background."""

    def __init__(self, argv, n, untrusted=False):
        if n < 1:
            raise ValueError(f"a pool of {n} workers")
        super().__init__(RawWorker([str(a) for a in argv], untrusted, n))

    def __len__(self):
        return self._raw.workers()

    @property
    def pids(self):
        return self._raw.pids()

    def broadcast(self, method, value=None, returns=None):
        """Calls `method` on every worker with `value`, written to shared memory once; returns
        the results in worker order, or raises the first error."""
        replies = self._raw.broadcast(method, *_payload.encode(value, self._raw))
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return [_payload.decode(*reply, returns, self._raw) for reply in replies]

    def map(self, method, items, progress=None, in_flight=None, timeout=None, returns=None):
        """Calls `method` once per item, `in_flight` calls at a time (by default two per
        worker), and returns the results in the order of `items`. `progress` is called in
        this thread after each call as `progress(done, total)` (`total` is None for an
        iterator without a length), or, if it has an `update` method (a tqdm bar), as
        `progress.update(1)`. The first failed call raises, once the calls under way have
        ended; Ctrl-C ends them at once (their workers are killed and restarted)."""
        total = len(items) if hasattr(items, "__len__") else None
        in_flight = in_flight or 2 * len(self)
        report = progress.update if hasattr(progress, "update") else None
        results, done = {}, 0
        items = iter(enumerate(items))
        with concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix="shm-map") as threads:
            pending = {}

            def submit(count):
                for index, item in itertools.islice(items, count):
                    pending[threads.submit(self.call, method, item, timeout, returns)] = index

            try:
                submit(in_flight)
                while pending:
                    finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in finished:
                        results[pending.pop(future)] = future.result()
                        done += 1
                        if report is not None:
                            report(1)
                        elif progress is not None:
                            progress(done, total)
                    submit(len(finished))
            except BaseException as failure:
                for future in pending:
                    future.cancel()
                if isinstance(failure, KeyboardInterrupt):
                    self._raw.cancel()
                raise
        return [results[i] for i in range(len(results))]


class Context:
    """What a served handler that takes two parameters gets besides its value: the method's
    name and `empty`, for results written in place in the worker's shared memory."""

    def __init__(self, raw):
        self._raw = raw

    @property
    def method(self):
        return self._raw.method

    def empty(self, shape, dtype=np.float64, order="C"):
        """A writable array in this worker's shared memory, returned without a copy."""
        return _empty(self._raw.alloc, shape, dtype, order)


def serve(handlers):
    """Serves `handlers` to the parent that started this process, until it asks the worker to
    stop. Each is `name: function` or `name: (function, schema)`; the schema says how a `serde`
    argument is read (without one, the function gets a `Raw`). A function takes the value,
    or the value and a `Context`, and returns an array, a `Serde`, a plain value, a tuple, or
    None. A plain value goes with its inferred schema: an `int` as "i64", which a Rust caller
    expecting an unsigned type would misread, so name the type (`shm.Serde(n, "u64")`). Its exceptions reach the caller as `RemoteError`s of kind "handler"; an argument it
    cannot read, of kind "bad-arguments". Calls are served one at a time."""
    table = {}
    for name, handler in handlers.items():
        function, schema = handler if isinstance(handler, tuple) else (handler, None)
        params = inspect.signature(function).parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        table[name] = (function, schema, len(positional) >= 2)

    def dispatch(method, codec, meta, inline, blocks, raw_context):
        function, schema, wants_context = table[method]
        try:
            value = _payload.decode(codec, meta, inline, blocks, schema, raw_context)
        except (Error, ValueError, TypeError) as e:
            raise BadArguments(f"{method}: {e}") from None
        result = function(value, Context(raw_context)) if wants_context else function(value)
        return _payload.encode(result, raw_context)

    _serve(list(table), dispatch)
