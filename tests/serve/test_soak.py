"""A bounded soak of `bitnet158 serve` in its own process (scripts/soak_serve.py, smaller).

300 mixed requests from 16 concurrent clients: every well-formed reply equals the library's own
generation, every malformed request gets its 4xx and an OpenAI error object, dropped clients
free their slots, and the server ends alive, idle and within a memory bound. `make soak` runs
the full 2,000 requests from 32 clients.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak_serve.py"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the server's memory from /proc"
)


def load_soak():
    spec = importlib.util.spec_from_file_location("soak_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_soak_300_requests_16_clients():
    soak = load_soak()
    report = soak.run_soak(requests=300, clients=16, warmup=50, rss_bound_mib=50.0)
    summary = report.markdown()
    assert not report.failures, summary
    assert report.well_formed > 150 and report.correct == report.well_formed, summary
    assert report.streamed > 0 and report.well_formed - report.streamed > 0, summary
    assert report.disconnects_mid_stream > 0, summary
    assert report.disconnects_mid_generation > 0, summary
    assert report.malformed > 20 and len(report.malformed_kinds) > 8, summary
    assert report.health_after and report.final_request_correct and report.server_alive, summary
    assert report.rss_growth_mib < 50.0, summary
    assert report.passed, summary
