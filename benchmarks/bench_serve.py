"""Serving throughput: 1, 4 and 16 concurrent streaming clients against `bitnet158 serve`.

The server runs in its own process on a loopback port, on a model of BitNet b1.58 2B4T's shape
(random ternary weights, built once and cached: the speed of a forward does not depend on the
values). Each client sends `--requests` streaming completions one after another, each asking
for exactly `--max-tokens` tokens (the model has no end-of-sequence token, so none ends early).
Reported per concurrency level: total generated tokens per second over the level's wall time,
time to first token (TTFT) and the per-token latency a client sees after its first token, as
medians; the ratio is total tokens/s against the 1-client level measured in the same run.

    python benchmarks/bench_serve.py [--clients 1 4 16] [--requests 2] [--max-tokens 32]
                                     [--model PATH] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bitnet158.config import ModelConfig
from bitnet158.formats.native import expected_shapes, save_native

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitnet158-bench"
PROMPT = " ".join(f"t{i}" for i in range(5, 21))  # 16 tokens


def config_2b4t(vocab: int = 128256) -> ModelConfig:
    """microsoft/bitnet-b1.58-2B-4T's architecture (config.json), without an EOS token."""
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=2560,
        intermediate_size=6912,
        num_layers=30,
        num_heads=20,
        num_kv_heads=5,
        family="bitnet-2b4t",
        hidden_act="relu2",
        rope_theta=500000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_ids=[],
    )


def word_tokenizer(vocab: int) -> str:
    """tokenizer.json of a word-level vocabulary "t0".."t{vocab-1}": every id decodes to text."""
    return json.dumps(
        {
            "version": "1.0",
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": None,
            "decoder": None,
            "model": {
                "type": "WordLevel",
                "vocab": {f"t{i}": i for i in range(vocab)},
                "unk_token": "t0",
            },
        }
    )


def build_model(path: Path) -> Path:
    """A 2B4T-shaped file of random ternary weights (packed directly) and an F16 embedding."""
    cfg = config_2b4t()
    rng = np.random.default_rng(0)
    # every byte of our packed layout holds four codes w + 1 in {0, 1, 2}
    codes = np.array([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3)
                      for c in range(3) for d in range(3)], dtype=np.uint8)  # fmt: skip
    tensors = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(".packed"):
            tensors[name] = codes[rng.integers(0, codes.size, shape, dtype=np.uint8)]
        elif name.endswith(".scale"):
            tensors[name] = np.float32([rng.uniform(0.5, 1.5)])
        elif name == "embed.weight":
            tensors[name] = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
        else:
            tensors[name] = np.ones(shape, np.float32)
    return save_native(path, cfg, tensors, word_tokenizer(cfg.vocab_size), source="random")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bitnet158.cli", "serve", str(model), "--port", str(port),
           "--name", "bench", "--slots", str(max(args.clients)), "--max-context",
           str(args.max_context), "--lm-head", args.lm_head, "--log-level", "warning"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health").raise_for_status()
            return proc
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not start in 10 minutes") from None
            time.sleep(0.2)


def one_request(url: str, max_tokens: int) -> dict:
    """A streamed completion: when each text chunk arrived, and the token count from usage."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    arrivals, tokens = [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", ())):
                arrivals.append(time.perf_counter() - t0)
    ttft = arrivals[0]
    per_token = (arrivals[-1] - ttft) / (tokens - 1) if tokens > 1 else float("nan")
    return {"ttft": ttft, "per_token": per_token, "tokens": tokens}


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(requests):
            r = one_request(url, max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_median_s": statistics.median(r["ttft"] for r in results),
        "ttft_max_s": max(r["ttft"] for r in results),
        "per_token_median_s": statistics.median(r["per_token"] for r in results),
    }


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--model", type=Path, default=None, help="model file (default: 2B4T-shaped)")
    ap.add_argument("--threads", type=int, default=None, help="server CPU threads (default all)")
    ap.add_argument("--max-context", type=int, default=512, help="tokens per slot (default 512)")
    ap.add_argument("--lm-head", choices=("exact", "int8", "q4"), default="exact")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()

    model = args.model
    if model is None:
        model = CACHE / "bitnet-2b4t-shape-random.safetensors"
        if not model.exists():
            print(f"building {model} (once)...", file=sys.stderr)
            build_model(model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, args)
    try:
        one_request(url, 4)  # warm-up: page in the weights
        levels = []
        for clients in args.clients:
            steps0 = metric(url, "bitnet158_decode_steps_total")
            seqs0 = metric(url, "bitnet158_decode_step_sequences_total")
            level = run_level(url, clients, args.requests, args.max_tokens)
            steps = metric(url, "bitnet158_decode_steps_total") - steps0
            seqs = metric(url, "bitnet158_decode_step_sequences_total") - seqs0
            level["mean_batch"] = seqs / steps if steps else float("nan")
            levels.append(level)
            print(f"{clients} clients: {level['tokens_per_second']:.2f} tokens/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(30)

    base = levels[0]["tokens_per_second"]
    load = os.getloadavg()[1]  # other processes share the CPUs: say how busy they were
    print(f"\nmodel: {model.name}, lm_head {args.lm_head}, {args.requests} requests per client "
          f"x {args.max_tokens} tokens, {os.cpu_count()} CPUs ({platform.machine()}), "
          f"5-minute load average {load:.1f}\n")  # fmt: skip
    print("| clients | total tokens/s | vs 1 client | TTFT median (s) | TTFT max (s) "
          "| per-token median (ms) | mean decode batch |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        print(f"| {lv['clients']} | {lv['tokens_per_second']:.2f} | "
              f"{lv['tokens_per_second'] / base:.2f}x | {lv['ttft_median_s']:.2f} | "
              f"{lv['ttft_max_s']:.2f} | {lv['per_token_median_s'] * 1e3:.0f} | "
              f"{lv['mean_batch']:.1f} |")  # fmt: skip
    report = {"model": str(model), "lm_head": args.lm_head, "requests_per_client": args.requests,
              "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
              "machine": platform.machine(), "load_average_5min": load,
              "levels": levels}  # fmt: skip
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
