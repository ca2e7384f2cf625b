"""Shared by the kernel tests: the thread count a test changes is put back after it."""

import pytest

from bitnet158 import _native


@pytest.fixture(autouse=True)
def _restore_threads():
    before = _native.get_num_threads()
    yield
    _native.set_num_threads(before)
