"""Soak `bitnet158 serve`: many mixed requests from concurrent clients, faults included.

The server runs in its own process on a free loopback port (the shipped model by default). The
requests are drawn with a fixed seed: completions and chat, streamed or not, greedy or seeded
sampling, small max_tokens, some with two choices; some clients drop the connection
mid-stream or mid-generation; some bodies are malformed (bad JSON, wrong types, unknown model,
oversize max_tokens, a prompt longer than the context, an oversize body, ...) and must get
their 4xx with an OpenAI error object naming the problem. Every well-formed reply must equal
what the library itself gives, `bitnet158.load(model).generate(...)` / `.chat(...)` with the
same settings (computed once per distinct request in this process). The server's queue is
kept shorter than the number of clients, so some requests get 429: those are counted and
retried. After the run the server must still answer /health with no sequence left active or
waiting, answer a last request correctly, have logged no traceback, and its resident memory
(VmRSS from /proc) must not have grown by more than --rss-bound-mib since the warm-up.

    python scripts/soak_serve.py [--requests 2000] [--clients 32] [--model PATH] [--json out.json]

Exit status 0 when every check held. tests/serve/test_soak.py runs a smaller soak through
`run_soak`; `make soak` runs the full one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

import bitnet158

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPTS = [
    "ROMEO:",
    "JULIET:\nO Romeo, Romeo!",
    "To be, or not to be",
    "KING HENRY:\nOnce more unto the breach",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "Café, naïve ✓ — ",  # multi-byte characters: the incremental decoder's edge
]
CONVERSATIONS = [
    [{"role": "user", "content": "Who art thou?"}],
    [{"role": "system", "content": "Speak as Hamlet."}, {"role": "user", "content": "Well?"}],
    [
        {"role": "user", "content": "Good morrow."},
        {"role": "assistant", "content": "Good morrow, friend."},
        {"role": "user", "content": "What news?"},
    ],
]
MAX_TOKENS = (1, 3, 8)
# (temperature, seed, stop): greedy, greedy cut at a newline, seeded sampling
SETTINGS = ((0.0, None, None), (0.0, None, "\n"), (0.8, 1, None), (0.8, 2, None))
MAX_ATTEMPTS = 400  # tries of one request that keeps getting 429 before it counts as failed
REQUEST_TIMEOUT = 120.0


@dataclass(frozen=True)
class Spec:
    """One request of the soak and what must come back."""

    kind: str  # "ok", "disconnect-stream", "disconnect-wait" or "malformed"
    route: str
    body: bytes
    stream: bool = False
    key: tuple | None = None  # the reference of an "ok" request (see Reference)
    n: int = 1
    label: str = ""  # which malformation
    status: int = 200  # the status a malformed request must get, and its error's fields
    param: str | None = None
    code: str | None = None


@dataclass
class Report:
    """What a soak did and found."""

    requests: int = 0
    clients: int = 0
    warmup_requests: int = 0
    well_formed: int = 0
    correct: int = 0
    streamed: int = 0
    disconnects_mid_stream: int = 0
    disconnects_mid_generation: int = 0
    finished_before_disconnect: int = 0  # a non-streamed reply that came before the client left
    malformed: int = 0
    malformed_kinds: dict[str, int] = field(default_factory=dict)
    rate_limited_429: int = 0
    wall_seconds: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_final_mib: float = 0.0
    rss_growth_mib: float = 0.0
    rss_bound_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_samples_mib: list[float] = field(default_factory=list)  # once a second during the run
    health_after: bool = False
    final_request_correct: bool = False
    server_alive: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def faults_injected(self) -> int:
        return self.disconnects_mid_stream + self.disconnects_mid_generation + self.malformed

    @property
    def passed(self) -> bool:
        return (
            not self.failures
            and self.correct == self.well_formed
            and self.health_after
            and self.final_request_correct
            and self.server_alive
            and self.rss_growth_mib < self.rss_bound_mib
        )

    def markdown(self) -> str:
        rows = [
            ("requests (after warm-up)", self.requests),
            ("concurrent clients", self.clients),
            ("warm-up requests", self.warmup_requests),
            ("well-formed, answered correctly", f"{self.correct} / {self.well_formed}"),
            ("  of which streamed", self.streamed),
            ("disconnects mid-stream", self.disconnects_mid_stream),
            ("disconnects mid-generation (non-streamed)", self.disconnects_mid_generation),
            ("  replies that came before the client left", self.finished_before_disconnect),
            ("malformed, right 4xx + error object", self.malformed),
            ("429 answers (retried)", self.rate_limited_429),
            ("faults injected", self.faults_injected),
            ("wall time", f"{self.wall_seconds:.1f} s"),
            ("requests per second", f"{self.requests / max(self.wall_seconds, 1e-9):.1f}"),
            ("server RSS after warm-up", f"{self.rss_after_warmup_mib:.1f} MiB"),
            ("server RSS during the run (min - max of samples)", self._rss_range()),
            ("server RSS at the end", f"{self.rss_final_mib:.1f} MiB"),
            ("RSS growth (bound)", f"{self.rss_growth_mib:+.1f} MiB (< {self.rss_bound_mib} MiB)"),
            ("server peak RSS (VmHWM)", f"{self.rss_peak_mib:.1f} MiB"),
            ("/health afterwards, nothing active", self.health_after),
            ("last request correct", self.final_request_correct),
            ("failures", len(self.failures)),
        ]
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.malformed_kinds.items()))
        rows.insert(9, ("  kinds", kinds))
        lines = ["| | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
        lines += [f"- {f}" for f in self.failures[:20]]
        return "\n".join(lines)

    def _rss_range(self) -> str:
        if not self.rss_samples_mib:
            return "-"
        return f"{min(self.rss_samples_mib):.1f} - {max(self.rss_samples_mib):.1f} MiB"


class Reference:
    """The library's own answers, computed once per distinct request."""

    def __init__(self, model_path: str | None) -> None:
        self.model = bitnet158.load(model_path, threads=1)
        self.cache: dict[tuple, dict[str, Any]] = {}

    def answer(self, key: tuple) -> dict[str, Any]:
        if key not in self.cache:
            route, which, max_tokens, temperature, seed, stop = key
            kwargs = dict(max_new_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)
            if route == COMPLETIONS:
                text = self.model.generate(PROMPTS[which], **kwargs)
            else:
                text = self.model.chat(CONVERSATIONS[which], **kwargs)
            stats = self.model.last_stats
            self.cache[key] = dict(
                text=text,
                finish_reason=stats.finish_reason,
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.new_tokens,
            )
        return self.cache[key]


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def malformed_requests(max_tokens_limit: int, max_body_bytes: int, max_n: int) -> list[Spec]:
    """Bodies the server must refuse, each with the status and error fields it must answer."""
    long_prompt = "ROMEO " * 1500  # ~3000 tokens: beyond the shipped model's 1024
    user = [{"role": "user", "content": "hi"}]
    bad = [
        ("bad-json", COMPLETIONS, b'{"prompt": "ROMEO:", "max_tokens": 4', 400, None, None),
        ("not-an-object", CHAT, b"[1, 2, 3]", 400, None, None),
        ("wrong-type-prompt", COMPLETIONS, _body(prompt=5), 400, "prompt", None),
        ("wrong-type-temperature", COMPLETIONS, _body(prompt="x", temperature="hot"), 400,
         "temperature", None),
        ("wrong-type-stream", CHAT, _body(messages=user, stream="yes"), 400, "stream", None),
        ("unknown-model", COMPLETIONS, _body(model="gpt-4", prompt="x"), 404, "model",
         "model_not_found"),
        ("unknown-model-chat", CHAT, _body(model="gpt-4", messages=user), 404, "model",
         "model_not_found"),
        ("oversize-max-tokens", COMPLETIONS, _body(prompt="x", max_tokens=max_tokens_limit + 1),
         400, "max_tokens", None),
        ("too-long-prompt", COMPLETIONS, _body(prompt=long_prompt, max_tokens=1), 400, "prompt",
         "context_length_exceeded"),
        ("too-long-chat", CHAT, _body(messages=[{"role": "user", "content": long_prompt}]), 400,
         "messages", "context_length_exceeded"),
        ("oversize-body", COMPLETIONS, _body(prompt="x" * (max_body_bytes + 1000)), 413, None,
         "body_too_large"),
        ("bad-role", CHAT, _body(messages=[{"role": "wizard", "content": "hi"}]), 400,
         "messages[0].role", None),
        ("no-messages", CHAT, _body(messages=[]), 400, "messages", None),
        ("too-many-choices", COMPLETIONS, _body(prompt="x", n=max_n + 1), 400, "n", None),
        ("token-outside-vocabulary", COMPLETIONS, _body(prompt=[1, 10**7]), 400, "prompt", None),
        ("negative-max-tokens", COMPLETIONS, _body(prompt="x", max_tokens=-1), 400, "max_tokens",
         None),
    ]  # fmt: skip
    return [
        Spec("malformed", route, body, label=label, status=status, param=param, code=code)
        for label, route, body, status, param, code in bad
    ]


def plan(count: int, seed: int, malformed: list[Spec], max_tokens_limit: int) -> list[Spec]:
    """`count` requests: ~75% well-formed, ~10% dropped by their client, ~15% malformed."""
    rng = random.Random(seed)
    specs = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.15:
            specs.append(rng.choice(malformed))
            continue
        route = rng.choice((COMPLETIONS, CHAT))
        which = rng.randrange(len(PROMPTS) if route == COMPLETIONS else len(CONVERSATIONS))
        fields: dict[str, Any] = (
            {"prompt": PROMPTS[which]} if route == COMPLETIONS
            else {"messages": CONVERSATIONS[which]}
        )  # fmt: skip
        if roll < 0.25:  # the client goes away while its (long) generation runs
            stream = roll < 0.20
            fields.update(max_tokens=max_tokens_limit, temperature=0.8, stream=stream)
            kind = "disconnect-stream" if stream else "disconnect-wait"
            specs.append(Spec(kind, route, _body(**fields), stream=stream))
            continue
        max_tokens = rng.choice(MAX_TOKENS)
        temperature, seed_, stop = rng.choice(SETTINGS)
        n = 2 if temperature == 0 and rng.random() < 0.1 else 1  # greedy choices are all equal
        stream = rng.random() < 0.5
        fields.update(max_tokens=max_tokens, temperature=temperature, stream=stream)
        if seed_ is not None:
            fields["seed"] = seed_
        if stop is not None:
            fields["stop"] = stop
        if n > 1:
            fields["n"] = n
        if stream and rng.random() < 0.5:
            fields["stream_options"] = {"include_usage": True}
        key = (route, which, max_tokens, temperature, seed_, stop)
        specs.append(Spec("ok", route, _body(**fields), stream=stream, key=key, n=n))
    return specs


# --- the server process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/PID/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field_name)


class ServerProcess:
    """`bitnet158 serve` in a subprocess on a free loopback port, its log in a temporary file."""

    def __init__(self, model: str | None, threads: int, limits: dict[str, int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", *([model] if model else []), "--port", str(self.port),
                "--threads", str(threads), "--log-level", "warning", "--name", "soak"]  # fmt: skip
        for name, value in limits.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bitnet158.cli", *args], stdout=self.log, stderr=self.log
        )

    def __enter__(self) -> ServerProcess:
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}: {self.output()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server did not start: {self.output()}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]


# --- the clients -----------------------------------------------------------------------------


def _check_error(spec: Spec, status: int, payload: Any) -> str | None:
    """Why a malformed request's answer is wrong, or None."""
    if status != spec.status:
        return f"{spec.label}: status {status}, want {spec.status}: {str(payload)[:200]}"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"{spec.label}: not an OpenAI error object: {str(payload)[:200]}"
    if not isinstance(error["message"], str) or not error["message"]:
        return f"{spec.label}: empty error message"
    if error["type"] != "invalid_request_error":
        return f"{spec.label}: error type {error['type']!r}"
    if error["param"] != spec.param or (spec.code and error["code"] != spec.code):
        return f"{spec.label}: param {error['param']!r} code {error['code']!r}, want " \
               f"{spec.param!r} {spec.code!r}"  # fmt: skip
    return None


def _check_answer(spec: Spec, want: dict, texts: dict, finishes: dict, usage: dict | None):
    """Why a well-formed request's answer differs from the library's, or None."""
    where = f"{spec.route} {spec.body.decode()[:120]}"
    if sorted(texts) != list(range(spec.n)):
        return f"{where}: choices {sorted(texts)}"
    for i in range(spec.n):
        if texts[i] != want["text"]:
            return f"{where}: choice {i} is {texts[i]!r}, the library says {want['text']!r}"
        if finishes.get(i) != want["finish_reason"]:
            return f"{where}: finish_reason {finishes.get(i)!r}, want {want['finish_reason']!r}"
    if usage is not None:
        expect = (want["prompt_tokens"], spec.n * want["completion_tokens"])
        if (usage["prompt_tokens"], usage["completion_tokens"]) != expect:
            return f"{where}: usage {usage}, want prompt/completion {expect}"
    return None


async def _read_stream(response: httpx.Response, chat: bool):
    """Texts, finish reasons and usage of an SSE response; an error string when malformed."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage, done = None, False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if done:
            return "data after [DONE]"
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            return f"error in stream: {chunk['error']}"
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            i = choice["index"]
            piece = (choice["delta"].get("content") or "") if chat else choice["text"]
            texts[i] = texts.get(i, "") + piece
            if choice["finish_reason"] is not None:
                if i in finishes:
                    return f"choice {i} finished twice"
                finishes[i] = choice["finish_reason"]
    if not done:
        return "the stream ended without [DONE]"
    return texts, finishes, usage


class Soak:
    """Runs specs against a server and fills a Report."""

    def __init__(self, url: str, reference: Reference, report: Report, seed: int = 0) -> None:
        self.url, self.reference, self.report = url, reference, report
        self.rng = random.Random(seed)  # when clients give up, and retry pauses

    async def run(self, specs: list[Spec], clients: int, count: bool = True) -> None:
        queue: asyncio.Queue[Spec] = asyncio.Queue()
        for spec in specs:
            queue.put_nowait(spec)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(
            base_url=self.url, limits=limits, timeout=REQUEST_TIMEOUT, headers=headers
        ) as http:

            async def worker() -> None:
                while not queue.empty():
                    spec = queue.get_nowait()
                    try:
                        await self.one(http, spec, count)
                    except Exception as exc:  # noqa: BLE001 - every fault is a finding
                        self.fail(
                            f"{spec.kind} {spec.label} {spec.route}: {type(exc).__name__}: {exc}"
                        )

            await asyncio.gather(*(worker() for _ in range(clients)))

    def fail(self, message: str) -> None:
        self.report.failures.append(message)

    async def one(self, http: httpx.AsyncClient, spec: Spec, count: bool) -> None:
        r = self.report
        for _ in range(MAX_ATTEMPTS):
            if spec.kind == "malformed":
                response = await http.post(spec.route, content=spec.body)
                payload = response.json()
                if response.status_code != 429:
                    problem = _check_error(spec, response.status_code, payload)
                    if problem:
                        self.fail(problem)
                    elif count:
                        r.malformed += 1
                        r.malformed_kinds[spec.label] = r.malformed_kinds.get(spec.label, 0) + 1
                    return
            elif spec.kind == "disconnect-wait":
                try:  # the client gives up while the server generates; the server must notice
                    response = await asyncio.wait_for(
                        http.post(spec.route, content=spec.body),
                        timeout=self.rng.uniform(0.005, 0.1),
                    )
                except asyncio.TimeoutError:
                    r.disconnects_mid_generation += count
                    return
                if response.status_code != 429:  # it finished first: still a valid answer
                    if response.status_code != 200:
                        self.fail(f"disconnect-wait: status {response.status_code}")
                    r.finished_before_disconnect += count
                    return
            else:
                async with http.stream("POST", spec.route, content=spec.body) as response:
                    if response.status_code != 429:
                        await self._streamed(spec, response, count)
                        return
                    await response.aread()
            r.rate_limited_429 += count
            await asyncio.sleep(self.rng.uniform(0.01, 0.05))
        self.fail(f"{spec.kind} {spec.route}: still 429 after {MAX_ATTEMPTS} attempts")

    async def _streamed(self, spec: Spec, response: httpx.Response, count: bool) -> None:
        r = self.report
        chat = spec.route == CHAT
        if response.status_code != 200:
            await response.aread()
            self.fail(
                f"{spec.kind} {spec.route}: status {response.status_code}: {response.text[:200]}"
            )
            return
        if spec.kind == "disconnect-stream":  # leave after the first chunk with text
            async for line in response.aiter_lines():
                if line.startswith("data: ") and ('"text":"' in line or '"content":"' in line):
                    break
            r.disconnects_mid_stream += count
            return  # leaving the `async with` closes the connection mid-stream
        want = self.reference.answer(spec.key)
        if spec.stream:
            result = await _read_stream(response, chat)
            if isinstance(result, str):
                self.fail(f"{spec.route} {spec.body.decode()[:120]}: {result}")
                return
            texts, finishes, usage = result
            if b"include_usage" in spec.body and usage is None:
                self.fail(f"{spec.route}: include_usage asked, no usage chunk")
                return
        else:
            payload = json.loads(await response.aread())
            choices = payload["choices"]
            texts = {c["index"]: c["message"]["content"] if chat else c["text"] for c in choices}
            finishes = {c["index"]: c["finish_reason"] for c in choices}
            usage = payload["usage"]
        problem = _check_answer(spec, want, texts, finishes, usage)
        if count:
            r.well_formed += 1
            r.streamed += spec.stream
        if problem:
            self.fail(problem)
        elif count:
            r.correct += 1


async def _sampling_rss(work, pid: int, report: Report) -> None:
    """Run `work`, sampling the server's RSS once a second meanwhile."""
    task = asyncio.ensure_future(work)
    while not task.done():
        report.rss_samples_mib.append(rss_mib(pid))
        await asyncio.wait([task], timeout=1.0)
    await task


async def _settle(url: str, timeout: float = 30.0) -> bool:
    """Wait until the server has no active or waiting sequence (closed clients noticed)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            health = (await http.get("/health")).json()
            if (
                health["status"] == "ok"
                and not health["active_sequences"]
                and not health["queue_depth"]
            ):
                return True
            await asyncio.sleep(0.05)
    return False


def run_soak(
    requests: int = 2000,
    clients: int = 32,
    model: str | None = None,
    threads: int = 1,
    seed: int = 0,
    warmup: int | None = None,
    rss_bound_mib: float = 50.0,
) -> Report:
    """Run a soak against a fresh server process and return its report (see the module doc)."""
    # fewer slots + queue places than clients: the bound is reached and answers 429
    limits = dict(slots=max(2, clients // 4), max_queue=max(1, clients // 2), max_tokens=64,
                  max_n=4, max_body_bytes=64 << 10)  # fmt: skip
    reference = Reference(model)
    malformed = malformed_requests(limits["max_tokens"], limits["max_body_bytes"], limits["max_n"])
    warmup = max(50, requests // 10) if warmup is None else warmup
    warm_specs = plan(warmup, seed + 1, malformed, limits["max_tokens"])
    specs = plan(requests, seed, malformed, limits["max_tokens"])
    for spec in warm_specs + specs:  # the references, before the clock starts
        if spec.key is not None:
            reference.answer(spec.key)
    report = Report(requests=requests, clients=clients, warmup_requests=warmup,
                    rss_bound_mib=rss_bound_mib)  # fmt: skip
    with ServerProcess(model, threads, limits) as server:
        soak = Soak(server.url, reference, report, seed)
        asyncio.run(soak.run(warm_specs, clients, count=False))
        asyncio.run(_settle(server.url))
        report.rss_after_warmup_mib = rss_mib(server.proc.pid)
        start = time.perf_counter()
        asyncio.run(_sampling_rss(soak.run(specs, clients), server.proc.pid, report))
        report.wall_seconds = time.perf_counter() - start
        report.health_after = asyncio.run(_settle(server.url))
        report.rss_final_mib = rss_mib(server.proc.pid)
        report.rss_growth_mib = report.rss_final_mib - report.rss_after_warmup_mib
        report.rss_peak_mib = rss_mib(server.proc.pid, "VmHWM")
        final = Spec("ok", COMPLETIONS, _body(prompt=PROMPTS[0], max_tokens=8, temperature=0),
                     key=(COMPLETIONS, 0, 8, 0.0, None, None))  # fmt: skip
        before = len(report.failures)
        asyncio.run(soak.run([final], 1, count=False))
        report.final_request_correct = len(report.failures) == before
        report.server_alive = server.proc.poll() is None
        log = server.output()
        if "Traceback" in log or "ERROR" in log:
            report.failures.append(f"the server logged an error: {log[-2000:]}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests after the warm-up")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--model", default=None, help="model to serve (default: the shipped one)")
    p.add_argument("--threads", type=int, default=1, help="server CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (default 10%%)")
    p.add_argument("--rss-bound-mib", type=float, default=50.0, help="allowed RSS growth")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    report = run_soak(args.requests, args.clients, args.model, args.threads, args.seed,
                      args.warmup, args.rss_bound_mib)  # fmt: skip
    print(report.markdown())
    if args.json:
        data = {**asdict(report), "faults_injected": report.faults_injected,
                "passed": report.passed}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    print("PASSED" if report.passed else "FAILED")
    return 0 if report.passed else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
