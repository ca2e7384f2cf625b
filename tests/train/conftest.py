"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import make_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Bit-identical reruns need the same matmul blocking: one thread, as in the subprocesses."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tokenizer():
    return make_tokenizer()
