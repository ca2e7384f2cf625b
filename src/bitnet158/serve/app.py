"""The OpenAI-compatible HTTP server: FastAPI routes over a `Batcher`.

    app = create_app(bitnet158.load("model.safetensors"))
    uvicorn.run(app, port=8000)             # or: bitnet158 serve model.safetensors

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE when
"stream": true), GET /health, GET /metrics (Prometheus text), GET / (a chat page). Every
error is an OpenAI error object with a 4xx status (5xx only for a fault of the server); an
exception while serving one request never reaches the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..api import Model
from ..errors import BitNetError
from .batching import (
    Batcher,
    DecodeBackend,
    EngineBackend,
    Event,
    Generation,
    QueueFull,
    SamplingParams,
)
from .config import Limits
from .metrics import Metrics
from .schema import APIError, ChatRequest, CompletionRequest, parse

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks for its client


def create_app(
    model: Model,
    model_name: str | None = None,
    limits: Limits | None = None,
    backend: DecodeBackend | None = None,
) -> FastAPI:
    """The FastAPI application serving `model` under `model_name` (default: the file's stem)."""
    limits = limits or Limits()
    name = model_name or model.path.stem
    backend = backend or EngineBackend(
        model.engine, limits.slots, model.max_context, model.kv_cache_dtype
    )
    batcher = Batcher(backend, limits.max_waiting)
    metrics = Metrics()
    metrics.gauges.update(
        queue_depth=("Sequences waiting for a batch slot.", lambda: batcher.waiting),
        active_sequences=("Sequences being generated.", lambda: batcher.active),
        batch_slots=("Sequences that can be generated together.", lambda: limits.slots),
    )
    metrics.counters.update(
        completion_tokens_total=("Tokens generated.", lambda: batcher.generated_tokens),
        decode_steps_total=("Batched decode steps run.", lambda: batcher.steps),
        decode_step_sequences_total=(
            "Sequences summed over decode steps (divided by decode_steps: the mean batch).",
            lambda: batcher.step_sequences,
        ),
    )
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="bitnet158", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.metrics, app.state.limits = batcher, metrics, limits
    app.add_middleware(_Accounting, metrics=metrics, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(error.body(), status_code=500)

    def model_card() -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "bitnet158",
            "max_context": model.max_context,
        }

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise APIError(
                404,
                f"The model {requested!r} does not exist; this server serves {name!r}",
                param="model",
                code="model_not_found",
            )

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("chat.html").read_text())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "active_sequences": batcher.active,
            "queue_depth": batcher.waiting,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def sampling(req, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        room = model.max_context - prompt_len + 1  # tokens that fit after the prompt
        if max_tokens is None:
            max_tokens = min(limits.max_tokens, room)
        elif max_tokens > limits.max_tokens:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                param="max_tokens",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=None if req.top_p >= 1 else req.top_p,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=req.stop_list,
        )

    def check_prompt(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > model.max_context:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is "
                f"{model.max_context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param=param)
        return ids

    def check_choices(count: int) -> None:
        if count > limits.max_n:
            raise APIError(
                400,
                f"{count} choices asked for (n times prompts); at most {limits.max_n}",
                param="n",
            )

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        check_model(req.model)
        prompts = req.prompts()
        check_choices(len(prompts) * req.n)
        ids = [
            check_prompt(
                model.tokenizer.encode(p, add_bos=True) if isinstance(p, str) else list(p),
                "prompt",
            )
            for p in prompts
        ]
        params = [sampling(req, req.max_tokens, len(p)) for p in ids]
        run = _Run(batcher, metrics, request)
        for i, (p, sp) in enumerate(zip(ids, params, strict=True)):
            run.add(p, sp, model, model.eos_ids, first_index=i * req.n, n=req.n)
        return await respond(run, req, "text_completion", "cmpl-", _completion_choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await request.body())
        check_model(req.model)
        check_choices(req.n)
        try:
            text = model.tokenizer.apply_chat_template(req.conversation())
        except BitNetError as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = check_prompt(model.tokenizer.encode(text, add_bos=False), "messages")
        run = _Run(batcher, metrics, request)
        run.add(
            ids, sampling(req, req.max_tokens, len(ids)), model, model.end_of_turn_ids, 0, req.n
        )
        return await respond(run, req, "chat.completion", "chatcmpl-", _chat_choice)

    async def respond(run: _Run, req, kind: str, id_prefix: str, choice: Callable):
        run.submit()
        head = {"id": id_prefix + secrets.token_hex(12), "object": kind,
                "created": int(time.time()), "model": name}  # fmt: skip
        if req.stream:
            chunks = _stream(run, {**head, "object": kind + (".chunk" if "chat" in kind else "")},
                             choice, req.include_usage)  # fmt: skip
            return StreamingResponse(
                chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts = {g.index: [] for g in run.gens}
        try:
            async for event in run.events(watch_disconnect=True):
                if event.finish_reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
                texts[event.seq.index].append(event.text)
        finally:
            run.cancel()  # a no-op when all ended
        choices = [
            choice(g.index, "".join(texts[g.index]), _finish(g.finish_reason), final=True)
            for g in sorted(run.gens, key=lambda g: g.index)
        ]
        return {**head, "choices": choices, "usage": run.usage()}

    return app


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason


def _completion_choice(index: int, text: str, finish: str | None, final: bool = False) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _chat_choice(index: int, text: str, finish: str | None, final: bool = False) -> dict:
    if final:  # the whole message of a non-streamed reply
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
    delta = {"content": text} if text or finish is None else {}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _stream(run: _Run, head: dict, choice: Callable, include_usage: bool):
    """SSE chunks of a streamed response; closing it (client gone) cancels the generation."""
    try:
        if head["object"] == "chat.completion.chunk":  # the role comes first, as OpenAI sends it
            for g in run.gens:
                first = {"index": g.index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}  # fmt: skip
                yield _sse({**head, "choices": [first]})
        async for event in run.events():
            if event.finish_reason == "error":
                yield _sse(
                    APIError(500, f"generation failed: {event.error}", "server_error").body()
                )
                run.cancel()
                break
            if event.text or event.finish_reason:
                finish = _finish(event.finish_reason)
                yield _sse({**head, "choices": [choice(event.seq.index, event.text, finish)]})
        else:
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})
        yield _sse("[DONE]")
    finally:
        run.cancel()  # a no-op when all ended; frees the slots when the client went away


class _Run:
    """The generations of one request, and the events they send to the event loop."""

    def __init__(self, batcher: Batcher, metrics: Metrics, request: Request) -> None:
        self.batcher, self.metrics, self.request = batcher, metrics, request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.gens: list[Generation] = []
        self.start = request.scope.get("bitnet158.start", time.perf_counter())
        self.first_token_seen = False

    def _post(self, event: Event) -> None:  # worker thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def add(self, ids, params, model: Model, stop_ids, first_index: int, n: int) -> None:
        for i in range(n):
            index = first_index + i
            self.gens.append(
                Generation(
                    ids,
                    params,
                    model.tokenizer,
                    frozenset(stop_ids),
                    self._post,
                    index=index,
                    rng_key=(index,) if index else (),
                )  # fmt: skip
            )

    def prompt_tokens(self) -> int:
        seen = {}
        for g in self.gens:  # each prompt counts once, however many choices it has
            seen[id(g.prompt_ids)] = len(g.prompt_ids)
        return sum(seen.values())

    def submit(self) -> None:
        try:
            self.batcher.submit(self.gens)
        except QueueFull as exc:
            raise APIError(
                429, f"the server is busy ({exc}); retry later", "rate_limit_error",
                code="queue_full",
            ) from None  # fmt: skip
        self.metrics.prompt_tokens += self.prompt_tokens()

    async def events(self, watch_disconnect: bool = False) -> AsyncIterator[Event]:
        """Events of all generations until each has ended."""
        running = len(self.gens)
        while running:
            if watch_disconnect:
                try:
                    event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await self.request.is_disconnected():
                        self.cancel()
                    continue
            else:
                event = await self.queue.get()
            if not self.first_token_seen and (event.text or event.finish_reason):
                self.first_token_seen = True
                self.metrics.ttft.observe(time.perf_counter() - self.start)
            running -= event.finish_reason is not None
            yield event

    def cancel(self) -> None:
        for g in self.gens:
            self.batcher.cancel(g)

    def usage(self) -> dict[str, int]:
        prompt = self.prompt_tokens()
        completion = sum(g.completion_tokens for g in self.gens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class _Accounting:
    """ASGI middleware: the body size bound (413), and request counts and durations."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = scope["bitnet158.start"] = time.perf_counter()
        path = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        limit = self.max_body_bytes
        too_large = APIError(
            413, f"the request body is larger than {limit} bytes", param=None, code="body_too_large"
        )

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            response = JSONResponse(too_large.body(), status_code=413)
            await response(scope, receive, counted_send)
            self.metrics.request_done(path, status, time.perf_counter() - start)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body without Content-Length
                    raise too_large
            return message

        try:
            await self.app(scope, limited_receive, counted_send)
        finally:
            self.metrics.request_done(path, status, time.perf_counter() - start)


def run_server(
    model: Model,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
) -> None:
    """Serve `model` over HTTP until interrupted (Ctrl-C ends the open streams)."""
    import uvicorn

    app = create_app(model, model_name=model_name, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
