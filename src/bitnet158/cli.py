"""The `bitnet158` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
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


# --- training: tokenize, train, sft, dpo, quantize, export (bitnet158.train.commands) --------


def _train_config(args: argparse.Namespace):
    from .train.loop import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        lr_peak=args.lr,
        lr_cooldown=args.lr_cooldown if args.lr_cooldown is not None else args.lr / 3,
        lr_min=args.lr_min,
        lr_stage1_floor=args.lr_stage1_floor,
        warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 10),
        drop_at=args.drop_at,
        wd_peak=args.wd,
        grad_clip=args.clip,
        grad_accum=args.grad_accum,
        dtype=args.dtype,
        strategy=args.strategy,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=not args.no_resume,
        eval_every=args.eval_every or max(1, args.steps // 10),
        log_every=args.log_every,
        lambda_schedule=args.lambda_schedule,
        lambda_warmup=args.lambda_warmup or min(1000, max(1, args.steps // 2)),
        progress=not args.quiet,
    )


def _train_args(p: argparse.ArgumentParser, steps: int, batch: int, seq: int, lr: float,
                wd: float, drop_at: float, floor: float, out: bool = True) -> None:  # fmt: skip
    if out:
        p.add_argument(
            "--out", required=True, help="run directory: checkpoints, logs; re-run to resume"
        )
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch,
        help=f"global batch, rows per step over all processes (default {batch})",
    )
    g.add_argument("--seq-len", type=int, default=seq, help=f"tokens per row (default {seq})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument(
        "--lr-cooldown",
        type=float,
        default=None,
        help="learning rate after the drop (default --lr / 3)",
    )
    g.add_argument("--lr-min", type=float, default=0.0, help="final learning rate (default 0)")
    g.add_argument(
        "--lr-stage1-floor",
        type=float,
        default=floor,
        help=f"stage-1 cosine ends at lr * this (default {floor:g})",
    )
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps/10)")
    g.add_argument(
        "--drop-at",
        type=float,
        default=drop_at,
        help=f"fraction of the run where the LR drops and weight decay stops "
        f"(default {drop_at:g}; 1 = one stage)",
    )
    g.add_argument("--wd", type=float, default=wd, help=f"peak weight decay (default {wd:g})")
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process and step")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "auto"),
        default="auto",
        help="matmuls in bfloat16 (autocast) or float32; auto (default): bfloat16 where the "
        "CPU has bf16 instructions (AVX512-BF16, AMX)",
    )
    g.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="data parallelism under torchrun (default ddp)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints (default: only at the end)",
    )
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument(
        "--lambda-schedule",
        choices=("constant", "linear", "min", "sigmoid"),
        default="constant",
        help="λ warm-up of the quantization (default constant = 1)",
    )
    g.add_argument(
        "--lambda-warmup",
        type=int,
        default=None,
        help="steps of the min/sigmoid λ warm-up (default: half the steps, at most 1000)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    if out:
        p.add_argument(
            "--export", default=None, help="at the end, write our packed .safetensors file"
        )
        p.add_argument(
            "--export-hf", default=None, help="at the end, write a transformers directory"
        )


def _print_summary(args: argparse.Namespace, summary: dict) -> int:
    from .train.distributed import current

    if current().is_main:
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for key, value in summary.items():
                print(f"{key}: {value}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .train.commands import tokenize

    stats = tokenize(args.files, args.out, args.tokenizer, field=args.field,
                     shard_tokens=args.shard_tokens, progress=not args.quiet)  # fmt: skip
    print(f"wrote {args.out}: {stats.tokens:,} tokens from {stats.documents:,} documents in "
          f"{stats.shards} shard(s); skipped {stats.skipped_empty} empty document(s)")  # fmt: skip
    return 0


def _model_config(args: argparse.Namespace, vocab_size: int | None):
    from .config import ModelConfig

    if args.config:
        with open(args.config, encoding="utf-8") as f:
            return ModelConfig.from_json(f.read())
    heads = args.heads or max(1, args.hidden // 64)
    return ModelConfig(
        vocab_size=args.vocab_size or vocab_size, hidden_size=args.hidden,
        intermediate_size=args.intermediate or (args.hidden * 8 // 3 + 63) // 64 * 64,
        num_layers=args.layers, num_heads=heads, num_kv_heads=args.kv_heads or heads,
        family=args.family, hidden_act="relu2" if args.family == "bitnet-2b4t" else "silu",
        max_position_embeddings=max(args.seq_len, 1024),
    )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from .train.commands import read_tokenizer, run_pretraining
    from .train.distributed import process_group

    tcfg = _train_config(args)
    if args.plot_schedule:
        from .train.schedules import plot_schedules

        lam = tcfg.lambda_sched() if args.lambda_schedule != "constant" else None
        plot_schedules(tcfg.schedule(), args.plot_schedule, lam)
        print(f"wrote {args.plot_schedule}")
        if not args.data:
            return 0
    if not args.data or not args.out:
        raise ValueError("train needs --data and --out (or only --plot-schedule)")
    model_config = None
    if args.init is None:
        import tokenizers

        tok = args.tokenizer
        if (
            tok is None
            and len(args.data) == 1
            and os.path.isfile(os.path.join(args.data[0], "tokenizer.json"))
        ):
            tok = args.data[0]
        vocab = tokenizers.Tokenizer.from_str(read_tokenizer(tok)[0]).get_vocab_size()
        model_config = _model_config(args, vocab)
    with process_group():
        summary = run_pretraining(
            args.data, args.out, tcfg, model_config=model_config, init=args.init,
            tokenizer=args.tokenizer, val_data=args.val_data, val_tokens=args.val_tokens,
            ternary=not args.fp, export=args.export, export_hf_dir=args.export_hf,
        )  # fmt: skip
        return _print_summary(args, summary)


def cmd_sft(args: argparse.Namespace) -> int:
    from .train.commands import run_sft
    from .train.distributed import process_group

    with process_group():
        summary = run_sft(args.model, args.data, args.out, _train_config(args),
                          reduction=args.loss_reduction, packing=not args.no_packing,
                          export=args.export, export_hf_dir=args.export_hf)  # fmt: skip
        return _print_summary(args, summary)


def cmd_dpo(args: argparse.Namespace) -> int:
    from .train.commands import run_dpo
    from .train.distributed import process_group

    with process_group():
        summary = run_dpo(args.model, args.data, args.out, _train_config(args), beta=args.beta,
                          ref_model=args.ref_model, export=args.export,
                          export_hf_dir=args.export_hf)  # fmt: skip
        return _print_summary(args, summary)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .train.commands import run_quantize

    tcfg = _train_config(args) if args.data else None
    summary = run_quantize(args.src, args.dst, tcfg, data=args.data, inner_norm=args.inner_norm,
                           native=args.native)  # fmt: skip
    return _print_summary(args, summary)


def cmd_export(args: argparse.Namespace) -> int:
    from .train.commands import export_run

    path = export_run(args.run, args.dst, hf=args.hf)
    print(f"wrote {path}")
    return 0


def _add_training_commands(sub) -> None:
    p = sub.add_parser(
        "tokenize", help="tokenize text / JSON-lines files into token shards",
        description="Tokenize text files (one document each) and JSON-lines files (one document "
        "per line, field --field) into memory-mapped token shards for `bitnet158 train`.",
    )  # fmt: skip
    p.add_argument("files", nargs="+", help="text or .jsonl files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--tokenizer",
        default=None,
        help=f"tokenizer.json, or a model whose tokenizer to use (default: {SHIPPED}'s)",
    )
    p.add_argument("--field", default="text", help="JSON-lines field holding the text")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser(
        "train", help="pretrain a BitNet b1.58 model (torchrun for many processes)",
        description="Pretrain with the BitNet b1.58 recipe: two-stage learning rate and weight "
        "decay, AdamW, gradient clipping, atomic checkpoints (re-run to resume). Many processes: "
        "torchrun --nproc_per_node N -m bitnet158.cli train ...",
    )  # fmt: skip
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="a token directory (bitnet158 tokenize) or text / .jsonl files",
    )
    p.add_argument(
        "--val-data", nargs="+", default=None, help="held-out data (default: the end of --data)"
    )
    p.add_argument(
        "--val-tokens", type=int, default=65536, help="tokens held out when no --val-data"
    )
    p.add_argument(
        "--tokenizer", default=None, help=f"tokenizer (default: the data's, else {SHIPPED}'s)"
    )
    p.add_argument(
        "--plot-schedule",
        default=None,
        metavar="PNG",
        help="write the learning-rate / weight-decay / λ schedules to a PNG (and exit "
        "unless --data is given)",
    )
    m = p.add_argument_group("model (a new one unless --init)")
    m.add_argument(
        "--init", default=None, help="start from this model or run (continued pretraining)"
    )
    m.add_argument("--config", default=None, help="ModelConfig JSON file")
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=None, help="default hidden/64")
    m.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    m.add_argument("--intermediate", type=int, default=None, help="default 8/3 hidden")
    m.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's")
    m.add_argument("--family", choices=("llama-b158", "bitnet-2b4t"), default="llama-b158")
    m.add_argument("--fp", action="store_true", help="train the full-precision twin instead")
    _train_args(p, steps=1000, batch=16, seq=256, lr=1.5e-3, wd=0.1, drop_at=0.5, floor=0.5,
                out=True)  # fmt: skip
    p.set_defaults(func=cmd_train)
    for action in p._actions:  # --out is optional when only plotting
        if action.dest == "out":
            action.required = False

    p = sub.add_parser(
        "sft", help="supervised fine-tuning on conversations (loss summed over assistant tokens)",
        description="Supervised fine-tuning, 2B4T recipe: the chat template, loss only on "
        "assistant tokens, summed (not averaged), short conversations packed. Data: JSON lines "
        "with messages, or prompt + completion.",
    )  # fmt: skip
    p.add_argument("--model", default=None, help=f"model or run to fine-tune (default {SHIPPED})")
    p.add_argument("--data", nargs="+", required=True, help=".jsonl conversation files")
    p.add_argument("--loss-reduction", choices=("sum", "mean"), default="sum")
    p.add_argument("--no-packing", action="store_true", help="one conversation per row")
    _train_args(p, steps=200, batch=8, seq=512, lr=3e-4, wd=0.0, drop_at=1.0, floor=0.1)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "dpo", help="direct preference optimization against a frozen reference",
        description="DPO: prompt / chosen / rejected JSON lines, a frozen copy of the starting "
        "model as reference (or --ref-model), beta 0.1 as in the 2B4T report.",
    )  # fmt: skip
    p.add_argument("--model", default=None, help=f"model or run to optimise (default {SHIPPED})")
    p.add_argument("--ref-model", default=None, help="reference model (default: --model, frozen)")
    p.add_argument("--data", nargs="+", required=True, help=".jsonl preference files")
    p.add_argument("--beta", type=float, default=0.1)
    _train_args(p, steps=100, batch=8, seq=512, lr=2e-7, wd=0.0, drop_at=1.0, floor=0.1)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser(
        "quantize", help="turn a Hugging Face fp16 model into a BitNet b1.58 (optionally fine-tune)",
        description="Replace every linear layer but lm_head of a Hugging Face causal LM (Llama, "
        "Qwen2, Mistral, SmolLM) by BitLinear, keeping the pretrained weights; with --data, "
        "fine-tune on text with a λ warm-up (recommended: quantizing alone loses most of the "
        "model). Writes a transformers directory with a BitNet quantization_config.",
    )  # fmt: skip
    p.add_argument("src", help="Hugging Face model directory (safetensors)")
    p.add_argument("dst", help="output transformers directory")
    p.add_argument("--data", nargs="+", default=None, help="text / .jsonl files to fine-tune on")
    p.add_argument(
        "--native", default=None, help="also write our packed .safetensors (Llama-shaped models)"
    )
    p.add_argument(
        "--inner-norm",
        action="store_true",
        help="parameter-free RMSNorm before each BitLinear (changes the model)",
    )
    _train_args(p, steps=1000, batch=8, seq=512, lr=1e-4, wd=0.0, drop_at=1.0, floor=0.1, out=False)
    p.set_defaults(func=cmd_quantize, lambda_schedule="min")

    p = sub.add_parser(
        "export", help="export a training checkpoint to our packed file or transformers",
        description="Export a training checkpoint (a run directory: its newest) at any point.",
    )  # fmt: skip
    p.add_argument("run", help="run directory or step-NNNNNN checkpoint directory")
    p.add_argument("dst", help="output .safetensors file (or directory with --hf)")
    p.add_argument("--hf", action="store_true", help="write a transformers directory instead")
    p.set_defaults(func=cmd_export)


# --- eval: perplexity and lm-evaluation-harness (bitnet158.eval) ---------------------------


def _progress_bar(desc: str, quiet: bool):
    """A tqdm factory for library progress hooks: total -> advance(n)."""
    from tqdm import tqdm

    def start(total: int):
        bar = tqdm(total=total, desc=desc, unit="window", file=sys.stderr, disable=quiet)
        return bar.update

    return start


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from .eval.perplexity import perplexity, relative_difference
    from .eval.scoring import make_scorer

    backends = ("engine", "torch") if args.backend == "both" else (args.backend,)
    results = {}
    for backend in backends:
        scorer = make_scorer(args.model, backend, threads=args.threads)
        results[backend] = perplexity(
            scorer,
            args.files,
            context=args.context,
            stride=args.stride,
            batch_size=args.batch_size,
            progress=_progress_bar(f"perplexity ({backend})", args.quiet),
        )
    report: dict = {backend: r.to_dict() for backend, r in results.items()}
    if len(results) == 2:
        report["relative_difference"] = relative_difference(
            results["engine"].ppl, results["torch"].ppl
        )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for backend, r in results.items():
        for f in r.files:
            print(
                f"{backend:6s}  {f.path}: ppl {f.ppl:.4f} over {f.scored} tokens "
                f"({f.bits_per_byte:.4f} bits/byte, {f.windows} windows)"
            )
        print(
            f"{backend:6s}  total: ppl {r.ppl:.4f} over {r.scored} tokens, context {r.context}, "
            f"stride {r.stride}, {r.tokens_per_second:.0f} tokens/s"
        )
    if "relative_difference" in report:
        print(f"engine vs torch: relative difference {report['relative_difference']:.2e}")
    return 0


def cmd_eval_harness(args: argparse.Namespace) -> int:
    from .eval.harness import main as harness_main

    harness_main(args.lm_eval_args)
    return 0


def _add_eval_commands(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="measure quality: perplexity, lm-evaluation-harness tasks",
        description="Evaluate a model: `eval ppl` (perplexity of text files), `eval harness` "
        "(lm-evaluation-harness with the bitnet158 model registered).",
    )
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = ev.add_parser(
        "ppl",
        help="perplexity of text files (strided sliding window)",
        description="Perplexity of each text file and of all together, with a sliding window: "
        "each forward sees up to --context tokens, windows start --stride tokens apart and "
        "score only the tokens no earlier window scored.",
    )
    p.add_argument("model", help=f"our .safetensors file, a Hugging Face directory, or '{SHIPPED}'")
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default: model's)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: context / 2)")
    p.add_argument(
        "--backend",
        choices=("engine", "torch", "both"),
        default="engine",
        help="engine: the native engine (default); torch: the reference model; both: "
        "both and their relative difference",
    )
    p.add_argument("--batch-size", type=int, default=1, help="windows per scoring call")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_ppl)
    p = ev.add_parser(
        "harness",
        help="lm-evaluation-harness with `--model bitnet158` (needs the eval extra)",
        description="Runs lm-eval's own command line with the bitnet158 adapter registered; "
        "every argument goes to lm-eval, e.g. --model bitnet158 --model_args "
        "path=MODEL,backend=engine --tasks arc_easy --batch_size 8.",
        add_help=False,
        prefix_chars="+",  # every "-" option is lm-eval's, passed through untouched
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval arguments")
    p.set_defaults(func=cmd_eval_harness)


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
    p.add_argument("--lm-head", choices=("exact", "int8", "q4"), default="exact",
                   help="output layer: stored dtype, int8 per row, or 4-bit groups of 32 "
                        "(fastest decode)")  # fmt: skip
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


def _add_bench_command(sub) -> None:
    from . import bench
    from .eval.efficiency import add_report_arguments

    p = sub.add_parser(
        "bench",
        help="measure bitnet158 against llama.cpp and transformers on random models",
        description=(
            "Build random-weight models of real shapes (2B-4T, 1bitLLM 700M) in our format and "
            "as GGUF TQ2_0/TQ1_0, then measure prefill and decode tokens/s, peak RSS and load "
            "time of bitnet158, llama.cpp (llama-cpp-python, the 'bench' extra) and "
            "transformers on the same threads, with the memory-bandwidth roofline of decode "
            "and the multiply-add ceiling of prefill. Prints a markdown table; --json keeps "
            "everything."
        ),
    )
    bench.add_arguments(p)
    add_report_arguments(p)  # --report DIR: the efficiency report (bitnet158.eval.efficiency)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.report is not None:
        from .eval.efficiency import report_from_args

        return report_from_args(args)
    from . import bench

    return bench.run_from_args(args)


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
        help="bitnet158: our packed file, 2 bits per weight (default); bitnet158-tq1: the same "
        "with 1.6 bits per weight (5 per byte: 20%% fewer bytes; decodes a few %% faster on "
        "Intel Sapphire Rapids, slower on AMD Zen 4; CPUs without AVX-512 VBMI repack it to 2 "
        "bits at load); gguf-tq2_0 / "
        "gguf-tq1_0: llama.cpp's bitnet architecture; hf: transformers' packed BitNet; "
        "hf-bf16: bf16 weights for fine-tuning",
    )
    p.add_argument(
        "--embedding-type",
        choices=("f16", "f32", "q8_0", "q6_k"),
        default="f16",
        help="GGUF token embedding (and untied output) type (default f16)",
    )
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_convert)
    _add_training_commands(sub)
    _add_eval_commands(sub)
    _add_serve_command(sub)
    _add_bench_command(sub)
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
