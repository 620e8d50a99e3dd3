"""A Python worker served with `shm.serve`: called by the Rust parent
tests/src/bin/shm-test-python-parent.rs and by the Python tests in test_serve.py."""

import os
import time

import numpy as np

import shm


def double(a, ctx):
    # Written in place into the worker's shared memory: returned without a copy.
    out = ctx.empty(a.shape, a.dtype, order="F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C")
    np.multiply(a, 2, out=out)
    return out


def scale(args):
    factor, a = args
    return a * factor


def fail(_):
    raise ValueError("the handler says no")


def sleep(seconds):
    time.sleep(seconds)


shm.serve(
    {
        "sum": lambda a: shm.Serde(float(a.sum()), "f64"),
        "double": double,
        "echo": lambda v: v,
        "echo_value": (lambda v: shm.Serde(v, "any"), "any"),
        "describe": (lambda v: f"{v[0]} x{v[1]}", ("str", "u64")),
        "scale": (scale, ("f64", None)),
        "half_f64": (lambda x: x / 2, "f64"),
        "pid": lambda _: shm.Serde(os.getpid(), "u32"),
        "fail": fail,
        "sleep": (sleep, "f64"),
        "nothing": lambda _: None,
    }
)
