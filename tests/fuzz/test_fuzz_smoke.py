"""A short run of every fuzz target (`make fuzz` runs them for minutes; RELIABILITY.md has the
figures): atheris (libFuzzer) mutates the seed corpora of real files for a fixed number of
executions, and any undocumented exception, 5xx answer or native fault fails the run.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fuzz_corpus import write_seeds
from fuzz_targets import TARGETS, check_response, make

from bitnet158.errors import FormatError, GenerationError

RUN_FUZZ = Path(__file__).resolve().parent / "run_fuzz.py"
# Executions per target, seeds included: a few seconds each on 2 cores.
RUNS = {"gguf": 60, "native": 200, "hf": 200, "serve": 300}


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-seeds")
    counts = write_seeds(out)
    assert all(n >= 4 for n in counts.values()), counts
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target, seeds, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    runs = RUNS[target]
    cmd = [sys.executable, str(RUN_FUZZ), target, str(corpus), str(seeds / target),
           f"-runs={runs}", "-seed=1", "-timeout=60", "-rss_limit_mb=3072",
           f"-artifact_prefix={tmp_path}/"]  # fmt: skip
    # The targets' model files go under tmp_path (libFuzzer exits without Python's atexit).
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = result.stdout[-4000:] + result.stderr[-8000:]
    assert result.returncode == 0, log
    assert re.search(rf"^Done {runs} runs", result.stderr, re.M), log
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*")), log


def test_documented_errors_pass_and_others_escape(monkeypatch, tmp_path):
    """The property itself: a target swallows our errors and lets any other exception out."""
    import fuzz_targets

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the target's files
    target = make("native")

    def raising(error):
        def use_model(path):
            raise error("planted")

        return use_model

    for allowed in (FormatError, GenerationError):
        monkeypatch.setattr(fuzz_targets, "use_model", raising(allowed))
        target(b"\x00any file")
    for finding in (IndexError, struct.error, ValueError, MemoryError, KeyError):
        monkeypatch.setattr(fuzz_targets, "use_model", raising(finding))
        with pytest.raises(finding, match="planted"):
            target(b"\x00any file")


def test_server_answers_are_checked():
    error = '{"error": {"message": "prompt: field required", "type": "invalid_request_error"}}'
    check_response(400, "application/json", error)
    check_response(200, "application/json", '{"choices": []}')
    stream = 'data: {"choices": []}\n\ndata: [DONE]\n\n'
    check_response(200, "text/event-stream; charset=utf-8", stream)
    with pytest.raises(AssertionError, match="HTTP 500"):
        check_response(500, "application/json", '{"error": {"message": "internal error"}}')
    with pytest.raises(AssertionError):  # a stream that ends without [DONE]
        check_response(200, "text/event-stream", 'data: {"choices": []}\n\n')
    with pytest.raises(AssertionError):  # an error chunk inside a 200 stream
        check_response(200, "text/event-stream", 'data: {"error": {}}\n\ndata: [DONE]\n\n')
    with pytest.raises(KeyError):  # a 4xx that is not an error object
        check_response(422, "application/json", '{"detail": "bad"}')
