"""Fixtures shared by the test files."""
import contextlib
import threading

import numpy as np
import pytest


@contextlib.contextmanager
def _lock_held_elsewhere(model):
    """The model's training lock held by another thread for the block, as if that thread
    were inside train_step."""
    held, done = threading.Event(), threading.Event()

    def holder():
        with model._lock:
            held.set()
            done.wait(60)
    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(60)
    try:
        yield
    finally:
        done.set()
        t.join()


@pytest.fixture
def lock_held_elsewhere():
    return _lock_held_elsewhere


class _OneRankComm:
    """A one-process stand-in for an mpi4py communicator (enough for a
    DistributedOptimizer without shards: nothing is exchanged)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def allgather(self, value):
        return [value]

    def bcast(self, value, root=0):
        return value

    def Allgather(self, send, recv):
        np.asarray(recv).reshape(-1).view(np.uint8)[...] = \
            np.asarray(send).reshape(-1).view(np.uint8)


@pytest.fixture
def one_rank_comm():
    return _OneRankComm()
