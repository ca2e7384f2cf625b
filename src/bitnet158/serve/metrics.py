"""Server counters and histograms, written in the Prometheus text format (version 0.0.4).

Updated from the event loop only; gauges of the batcher are read when /metrics is scraped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

PREFIX = "bitnet158_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = [*buckets, math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Metrics:
    """What /metrics reports: requests, tokens, latencies, and the batcher's state."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (path, status)
        self.duration: dict[str, Histogram] = defaultdict(Histogram)  # by path
        self.ttft = Histogram()
        self.prompt_tokens = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def request_done(self, path: str, status: int, seconds: float) -> None:
        self.requests[path, str(status)] += 1
        self.duration[path].observe(seconds)

    def render(self) -> str:
        """The exposition text."""
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> str:
            out.append(f"# HELP {PREFIX}{name} {help}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            return PREFIX + name

        name = family("requests_total", "counter", "HTTP requests answered, by path and status.")
        for (path, status), n in sorted(self.requests.items()):
            out.append(f"{name}{_labels({'path': path, 'status': status})} {n}")

        name = family(
            "request_duration_seconds",
            "histogram",
            "Time from a request's arrival to the end of its response (streams included).",
        )
        for path, h in sorted(self.duration.items()):
            self._histogram(out, name, h, {"path": path})
        name = family(
            "time_to_first_token_seconds",
            "histogram",
            "Time from a generation request's arrival to its first generated text.",
        )
        self._histogram(out, name, self.ttft, {})

        help = "Prompt tokens of accepted requests."
        out.append(f"{family('prompt_tokens_total', 'counter', help)} {self.prompt_tokens}")
        for metric, (help, read) in self.counters.items():
            out.append(f"{family(metric, 'counter', help)} {_number(read())}")
        for metric, (help, read) in self.gauges.items():
            out.append(f"{family(metric, 'gauge', help)} {_number(read())}")
        return "\n".join(out) + "\n"

    @staticmethod
    def _histogram(out: list[str], name: str, h: Histogram, labels: dict[str, str]) -> None:
        for bound, n in zip(h.bounds, h.counts, strict=True):
            out.append(f"{name}_bucket{_labels({**labels, 'le': _number(float(bound))})} {n}")
        out.append(f"{name}_sum{_labels(labels)} {_number(h.sum)}")
        out.append(f"{name}_count{_labels(labels)} {h.count}")
