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
