"""Fixtures of the torch-model tests."""

import pytest


@pytest.fixture
def transformers_quiet():
    """transformers warns that CPU BitNet inference is slow; the tests know."""
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(previous)
