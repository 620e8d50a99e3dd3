"""What the Python package's tests share: the workers they start, and the check that each test
leaves /dev/shm as it found it."""

import os
import sys
from pathlib import Path

import pytest

import shm

# The Rust test worker (tests/src/bin/shm-test-worker.rs).
RUST_WORKER = os.environ["SHM_TEST_WORKER"]
# A Python worker served with shm.serve.
PYTHON_WORKER = [sys.executable, str(Path(__file__).with_name("served.py"))]


def shm_listing():
    return sorted(os.listdir("/dev/shm"))


@pytest.fixture
def clean_shm():
    """Fails the test if it leaves anything behind in /dev/shm."""
    before = shm_listing()
    yield
    assert shm_listing() == before


@pytest.fixture
def worker(clean_shm):
    with shm.Worker([RUST_WORKER]) as w:
        yield w


@pytest.fixture
def python_worker(clean_shm):
    with shm.Worker(PYTHON_WORKER) as w:
        yield w
