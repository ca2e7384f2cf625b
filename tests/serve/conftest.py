"""Fixtures of the serving tests: a small random model, and real servers on loopback ports."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn
from serve_fixtures import random_model

import bitnet158
from bitnet158.serve import Limits, create_app
from bitnet158.serve.batching import EngineBackend


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a thread of the test process."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class SlowBackend(EngineBackend):
    """The engine backend with a pause per decode step, so requests stay in flight a while."""

    def __init__(self, *args, pause: float = 0.02, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pause = pause

    def decode(self, slots, tokens):
        time.sleep(self.pause)
        return super().decode(slots, tokens)


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
    """A server with 2 slots, a wait queue of 1 and 20 ms per decode step."""
    backend = SlowBackend(model.engine, 2, model.max_context)
    app = create_app(model, limits=Limits(slots=2, max_waiting=1), backend=backend)
    with ServerThread(app) as srv:
        yield srv
