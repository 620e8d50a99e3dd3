"""The Python row of `cargo xtask bench`: a Python parent has a worker sum a 64 MiB f64 array,
through shm and through what a Python user would otherwise write, in one run. Prints one JSON
object of median round trips in seconds.

    python python_parent.py --worker RUST_WORKER [--mib 64] [--runs 15]

The Rust worker serves "sum" returning (f64, u64); run with `--serve`, this script is the
Python worker of the shm rows that compare like with like (numpy sums on both sides)."""

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

import shm


def timed(f, expected, runs):
    f()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = f()
        times.append(time.perf_counter() - start)
        if result != expected:
            raise SystemExit(f"a sum of {result}, expected {expected}")
    return statistics.median(times)


def attach_and_sum(name, shape):
    segment = shared_memory.SharedMemory(name=name)
    # Attaching registers the segment with the resource tracker the pool shares with its
    # parent (Python < 3.13 has no `track=False`), which would then report the parent's
    # unlink as a leak: the usual workaround.
    resource_tracker.unregister(segment._name, "shared_memory")
    try:
        return float(np.ndarray(shape, np.float64, buffer=segment.buf).sum())
    finally:
        segment.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    n = args.mib * (1 << 20) // 8
    a = np.arange(n, dtype=np.float64)
    expected = float(a.sum())
    out = {}
    with shm.Worker([args.worker]) as w:
        out["shm, Rust worker, one copy"] = timed(lambda: w.call("sum", a, returns=("f64", "u64"))[0], expected, args.runs)
        in_place = w.empty(n)
        in_place[:] = a
        out["shm, Rust worker, written in place"] = timed(lambda: w.call("sum", in_place, returns=("f64", "u64"))[0], expected, args.runs)
    with shm.Worker([sys.executable, __file__, "--serve"]) as w:
        out["shm, Python worker, one copy"] = timed(lambda: w.call("sum", a, returns="f64"), expected, args.runs)
    with mp.Pool(1) as pool:
        out["multiprocessing.Pool (pickle)"] = timed(lambda: pool.apply(np.sum, (a,)), expected, args.runs)

        def by_hand():
            segment = shared_memory.SharedMemory(create=True, size=a.nbytes)
            try:
                np.ndarray(a.shape, a.dtype, buffer=segment.buf)[:] = a
                return pool.apply(attach_and_sum, (segment.name, a.shape))
            finally:
                segment.close()
                segment.unlink()

        out["multiprocessing.shared_memory by hand"] = timed(by_hand, expected, args.runs)
    for way, seconds in out.items():
        print(f"{way}\t{seconds}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        shm.serve({"sum": lambda a: shm.Serde(float(a.sum()), "f64")})
    else:
        main()
