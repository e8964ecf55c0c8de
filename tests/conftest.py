"""Fixtures shared by the test files."""
import contextlib
import threading

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
