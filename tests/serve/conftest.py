"""Fixtures of the serving tests: a small random model, and real servers on loopback ports."""

from __future__ import annotations

import pytest
from serve_fixtures import ServerThread, SlowBackend, random_model

import bitnet158
from bitnet158.serve import Limits, create_app


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("serve") / "tiny-serve.safetensors")


@pytest.fixture(scope="session")
def model(model_path):
    return bitnet158.load(model_path, threads=1)


@pytest.fixture(scope="module")
def server(model):
    """A server with the default backend and small limits."""
    limits = Limits(max_body_bytes=64 << 10, max_tokens=200, max_n=4, max_waiting=16, slots=4)
    with ServerThread(create_app(model, limits=limits)) as srv:
        yield srv


@pytest.fixture
def slow_server(model):
    """A server with 2 slots, a wait queue of 1 and 20 ms per engine step."""
    backend = SlowBackend(model.engine, 2, model.max_context)
    app = create_app(model, limits=Limits(slots=2, max_waiting=1), backend=backend)
    with ServerThread(app) as srv:
        yield srv
