"""The `bitnet158` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .errors import BitNetError
from .formats.convert import TARGETS

SHIPPED = "shakespeare-b158"


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help=f"our .safetensors file, a Hugging Face checkpoint directory, or '{SHIPPED}' (default)",
    )
    p.add_argument(
        "-n", "--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)"
    )
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeats (default 1.0)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--max-context", type=int, default=None, help="KV-cache length (default: the model's)"
    )


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def _load(args: argparse.Namespace):
    from .api import load

    return load(args.model, threads=args.threads, max_context=args.max_context)


def _print_stats(stats, stream=sys.stderr) -> None:
    print(
        f"\n[{stats.prompt_tokens} prompt tokens in {stats.prefill_seconds:.2f} s, "
        f"{stats.new_tokens} new tokens at {stats.tokens_per_second:.1f} tokens/s]",
        file=stream,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    kwargs = _sampling_kwargs(args)
    if args.json:
        text = model.generate(prompt, **kwargs)
        s = model.last_stats
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "text": text,
                    "prompt_tokens": s.prompt_tokens,
                    "new_tokens": s.new_tokens,
                    "tokens_per_second": s.tokens_per_second,
                }
            )
        )
        return 0
    print(prompt, end="", flush=True)
    for delta in model.generate(prompt, stream=True, **kwargs):
        print(delta, end="", flush=True)
    _print_stats(model.last_stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = []
        for delta in model.chat(messages, stream=True, **_sampling_kwargs(args)):
            print(delta, end="", flush=True)
            reply.append(delta)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .formats.convert import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .formats.convert import convert

    def progress(layers):
        return tqdm(layers, desc="layers", unit="layer", file=sys.stderr, leave=False)

    summary = convert(
        args.src,
        args.dst,
        force=args.force,
        to=args.to,
        embedding_type=args.embedding_type,
        progress=None if args.quiet else progress,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"wrote {summary['path']} ({summary['from']} -> {summary['to']}): "
        f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB, "
        f"{summary['ternary_parameters']:,} ternary weights at "
        f"{summary['ternary_bits_per_weight']:.2f} bits per weight"
    )
    return 0


# --- serve: the OpenAI-compatible HTTP server (bitnet158.serve) -------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.config import Limits

    try:
        from .serve.app import run_server
    except ImportError as exc:
        raise BitNetError(
            f"serving needs the 'serve' extra ({exc.name} is missing): "
            "pip install 'bitnet158[serve]'"
        ) from None
    from .api import load

    model = load(args.model, threads=args.threads, max_context=args.max_context,
                 lm_head=args.lm_head, kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_waiting=args.max_queue,
        slots=args.slots,
    )
    print(f"serving {model.path} at http://{args.host}:{args.port}/ (chat page), "
          f"OpenAI API under /v1", file=sys.stderr)  # fmt: skip
    run_server(model, args.host, args.port, args.name, limits, args.log_level)
    return 0


def _add_serve_command(sub) -> None:
    from .serve.config import Limits

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description=(
            "OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions "
            '(streaming with "stream": true), /health, /metrics (Prometheus), and a chat page '
            "at /. Concurrent requests are decoded together (continuous batching)."
        ),
    )
    p.add_argument("model", nargs="?", default=None,
                   help=f"our .safetensors file, a Hugging Face checkpoint directory, or "
                        f"'{SHIPPED}' (default)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="model id in the API (default: the file's stem)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--max-context", type=int, default=None, help="tokens per sequence (default: the model's)"
    )
    p.add_argument("--lm-head", choices=("exact", "int8"), default="exact",
                   help="output layer: stored dtype, or int8 per row (faster)")  # fmt: skip
    p.add_argument("--kv-cache-dtype", choices=("float32", "float16"), default="float32",
                   help="KV cache precision (float16: half the memory)")  # fmt: skip
    g = p.add_argument_group("limits")
    g.add_argument("--slots", type=int, default=d.slots,
                   help=f"sequences decoded together (default {d.slots})")  # fmt: skip
    g.add_argument("--max-queue", type=int, default=d.max_waiting,
                   help=f"sequences waiting for a slot before HTTP 429 (default "
                        f"{d.max_waiting})")  # fmt: skip
    g.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"largest max_tokens a request may ask (default {d.max_tokens})")  # fmt: skip
    g.add_argument("--max-n", type=int, default=d.max_n,
                   help=f"choices per request (default {d.max_n})")  # fmt: skip
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body (default {d.max_body_bytes})")  # fmt: skip
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))  # fmt: skip
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitnet158",
        description=(
            "Run, inspect and convert 1.58-bit BitNet b1.58 models on the CPU. "
            f"Without --model, commands use the shipped model '{SHIPPED}'."
        ),
    )
    parser.add_argument("--version", action="version", version=f"bitnet158 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate", help="continue a prompt", description="Continue a prompt, streaming the text."
    )
    p.add_argument(
        "prompt", nargs="?", default=None, help="prompt text (default: read standard input)"
    )
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="interactive chat using the model's chat template",
        description="Interactive chat: the model's chat template, streamed replies.",
    )
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "info",
        help="describe a model file or checkpoint",
        description="Architecture, sizes, bits per weight and format of a model.",
    )
    p.add_argument("path", nargs="?", default=None, help=f"model path (default: {SHIPPED})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between bitnet158, GGUF and Hugging Face formats",
        description=(
            "Convert any supported model (our .safetensors file, a Hugging Face checkpoint "
            "directory, a llama.cpp / bitnet.cpp GGUF file; the kind is detected) to another "
            "format. The output is written under a temporary name and renamed when complete."
        ),
    )
    p.add_argument("src", help="our .safetensors file, a Hugging Face directory or a .gguf file")
    p.add_argument("dst", help="output file (.safetensors, .gguf) or directory (hf, hf-bf16)")
    p.add_argument(
        "--to",
        choices=TARGETS,
        default="bitnet158",
        help="bitnet158: our packed file (default); gguf-tq2_0 / gguf-tq1_0: llama.cpp's "
        "bitnet architecture; hf: transformers' packed BitNet; hf-bf16: bf16 weights for "
        "fine-tuning",
    )
    p.add_argument(
        "--embedding-type",
        choices=("f16", "f32", "q8_0"),
        default="f16",
        help="GGUF token embedding type (default f16)",
    )
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_convert)
    _add_serve_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BitNetError as exc:
        print(f"bitnet158: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"bitnet158: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
