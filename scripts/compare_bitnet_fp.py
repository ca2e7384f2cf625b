"""BitNet b1.58 against its full-precision twin at a few sizes, on the shipped corpus.

The shape of the paper's Table 1 at toy scale: for each size, the same architecture (SwiGLU,
subln, RoPE, tied embeddings), the same data order and token budget, once with BitLinear
(ternary weights, int8 activations) and once with nn.Linear; each with its own recipe (the
paper's BitNet LR is ~5x the fp16 one). Held-out perplexity on a play the models never saw.

    python scripts/compare_bitnet_fp.py            # writes docs/bitnet_vs_fp.{md,png,json}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bitnet158.config import ModelConfig
from bitnet158.nn.model import Transformer
from bitnet158.train.data import load_tokens, token_dtype, tokenize_files
from bitnet158.train.pretrain import TrainConfig, evaluate_loss, train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from train_shipped_model import HELD_OUT, fetch_corpus, train_tokenizer  # noqa: E402

# (hidden, layers, intermediate): intermediate ~ 8/3 hidden rounded to 64, as LLaMA does.
SIZES = {"xs": (64, 2, 192), "s": (128, 3, 320), "m": (192, 4, 512)}
# The shipped model's two recipes (scripts/train_shipped_model.py), each tried on both kinds of
# model, so that neither column is handicapped by a learning rate tuned for the other.
HIGH, LOW = dict(lr_peak=4e-3, lr_cooldown=2.5e-3), dict(lr_peak=1e-3, lr_cooldown=6e-4)
RECIPES = {
    "bitnet": (True, HIGH),
    "fp": (False, LOW),
    "bitnet-lowlr": (True, LOW),
    "fp-highlr": (False, HIGH),
}


def corpus(work: Path, vocab: int) -> tuple[Tokenizer, object, object]:
    files = fetch_corpus(ROOT / "data")
    train_files = [f for f in files if f.name != HELD_OUT]
    tok_path = work / "tokenizer.json"
    if not tok_path.exists():
        work.mkdir(parents=True, exist_ok=True)
        train_tokenizer(train_files, vocab).save(str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|end_of_text|>")
    dtype = token_dtype(tok.get_vocab_size())
    for name, group in (("train", train_files), ("val", [f for f in files if f.name == HELD_OUT])):
        if not (work / f"{name}.bin").exists():
            tokenize_files(
                group, lambda t: tok.encode(t).ids, tok.get_vocab_size(), eos, work / f"{name}.bin"
            )
    return (
        tok,
        load_tokens(work / "train.bin", dtype),
        load_tokens(work / "val.bin", dtype),
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for size, color in zip(SIZES, ("tab:blue", "tab:green", "tab:red"), strict=False):
        for kind, style in (("bitnet", "-"), ("fp", "--")):
            run = best(results, size, kind)
            if not run:
                continue
            steps = [h["step"] for h in run["history"]]
            ppl = [h["val_ppl"] for h in run["history"]]
            ax1.plot(steps, ppl, style, color=color, label=f"{size} {kind}")
    ax1.set(xlabel="step", ylabel="held-out perplexity", yscale="log", title="Training curves")
    ax1.legend(fontsize=8)
    for kind, marker in (("bitnet", "o-"), ("fp", "s--")):
        pts = [(best(results, s, kind)["params"], best(results, s, kind)["val_ppl"])
               for s in SIZES if best(results, s, kind)]  # fmt: skip
        if pts:
            ax2.plot(
                *zip(*pts, strict=True),
                marker,
                label="BitNet b1.58" if kind == "bitnet" else "fp32 twin",
            )
    ax2.set(xlabel="non-embedding parameters", ylabel="held-out perplexity", xscale="log",
            title="Final held-out perplexity")  # fmt: skip
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def best(results: dict, size: str, kind: str) -> dict | None:
    """The run of `kind` (bitnet / fp) at `size` with the lowest held-out perplexity."""
    runs = [r for name, r in results.items()
            if name.split("-")[0] == size and name.split("-")[1] == kind]  # fmt: skip
    return min(runs, key=lambda r: r["val_ppl"]) if runs else None


def lr_cell(run: dict) -> str:
    return f"{run['val_ppl']:.2f} (lr {run['train']['lr_peak']:g})"


def table(results: dict, tokens: int) -> str:
    tried = {kind: sorted({r["train"]["lr_peak"] for name, r in results.items()
                           if name.split("-")[1] == kind}) for kind in ("bitnet", "fp")}  # fmt: skip
    lines = [
        f"Held-out perplexity on {HELD_OUT} (a play never trained on), {tokens:,} training "
        "tokens per run, the same data order and initial weights for every run. Each column "
        "shows the better of the peak learning rates tried for that kind of model "
        f"(BitNet: {', '.join(f'{x:g}' for x in tried['bitnet'])}; fp32: "
        f"{', '.join(f'{x:g}' for x in tried['fp'])}).",
        "",
        "| size | hidden × layers | non-embedding params | BitNet b1.58 | fp32 twin | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for size, (hidden, layers, _) in SIZES.items():
        b, f = best(results, size, "bitnet"), best(results, size, "fp")
        if not (b and f):
            continue
        lines.append(
            f"| {size} | {hidden} × {layers} | {b['params']:,} | {lr_cell(b)} | {lr_cell(f)} | "
            f"{b['val_ppl'] / f['val_ppl']:.3f} |"
        )
    lines += [
        "",
        "Every run:",
        "",
        "| run | peak lr | held-out ppl |",
        "|---|---|---|",
    ]
    for name, r in sorted(results.items()):
        lines.append(f"| {name} | {r['train']['lr_peak']:g} | {r['val_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "compare")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="only rewrite the table and plot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok, train_tokens, val_tokens = corpus(args.work, args.vocab)
    results_path = args.docs / "bitnet_vs_fp.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    args.docs.mkdir(parents=True, exist_ok=True)
    for size in [] if args.report_only else args.sizes:
        hidden, layers, inter = SIZES[size]
        cfg = ModelConfig(
            vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=inter,
            num_layers=layers, num_heads=hidden // 32, num_kv_heads=hidden // 32,
            max_position_embeddings=args.seq_len,
        )  # fmt: skip
        for kind in args.recipes:
            ternary, lrs = RECIPES[kind]
            if f"{size}-{kind}" in results:
                continue  # done in an earlier invocation
            torch.manual_seed(0)  # the same initial latent weights for both twins
            model = Transformer(cfg, ternary=ternary)
            tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               warmup_steps=args.steps // 10, eval_every=args.steps // 8,
                               log_every=100, eval_tokens=len(val_tokens), **lrs)  # fmt: skip
            t0 = time.time()
            history = train(
                model,
                train_tokens,
                val_tokens,
                tcfg,
                log=lambda s, tag=f"{size} {kind}": print(tag, s),
            )
            val = evaluate_loss(model, val_tokens, args.seq_len, len(val_tokens))
            results[f"{size}-{kind}"] = {
                "params": model.num_parameters(),
                "val_loss": val,
                "val_ppl": math.exp(val),
                "seconds": time.time() - t0,
                "history": history,
                "train": vars(tcfg),
            }
            results_path.write_text(json.dumps(results, indent=1))
    tokens = args.steps * args.batch_size * args.seq_len
    (args.docs / "bitnet_vs_fp.md").write_text(table(results, tokens))
    plot(results, args.docs / "bitnet_vs_fp.png")
    print(table(results, tokens))


if __name__ == "__main__":
    main()
