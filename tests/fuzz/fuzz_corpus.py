"""Seed corpora of the fuzz targets, built from real small files at run time.

    python tests/fuzz/fuzz_corpus.py OUT_DIR [TARGET ...]     # OUT_DIR/<target>/seed-*

- gguf: our GGUF writer's output for the shipped model (its header: the tensor data is added
  by the target) and for small models cut from it (one layer, a 300-token vocabulary): bitnet
  and llama architectures, TQ2_0 and TQ1_0, F16 / Q6_K / Q8_0 embeddings.
- native: our files of the serving tests' random model, of the small models, and the shipped
  model's header.
- hf: every family's checkpoint as tests/formats/hf_builders.py writes it with transformers
  (BitNet packed, sharded and bf16, 1bitLLM, Llama bitlinear and dequantized, OLMo-Bitnet),
  plus a tokenizer.json and, for one, tokenizer_config.json with a chat template; and each
  family's config.json alone (small inputs whose every mutation lands in the config).
- serve: OpenAI request bodies of every shape the schema accepts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_targets import (  # noqa: E402  (it also puts tests/serve and tests/formats on the path)
    TARGETS,
    gguf_split,
    native_split,
    pack_files,
    shipped_gguf,
)
from serve_fixtures import CHAT_TEMPLATE, random_model, tokenizer_json  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from bitnet158.formats.convert import SHIPPED_PATH, LazyCanonical  # noqa: E402
from bitnet158.formats.native import (  # noqa: E402
    NativeCheckpoint,
    load_native,
    pack_tensors,
    save_native,
)


def small_checkpoint(llama: bool = False) -> NativeCheckpoint:
    """The shipped model cut to one layer and a 300-token vocabulary (exportable to GGUF:
    SwiGLU, K a multiple of 256); `llama`: without sub-norms and with an untied output."""
    shipped = load_native(SHIPPED_PATH)
    text = tokenizer_json()
    vocab = Tokenizer.from_str(text).get_vocab_size()
    cfg = replace(shipped.config, vocab_size=vocab, num_layers=1, max_position_embeddings=64,
                  bos_token_id=0, eos_token_ids=[1])  # fmt: skip
    canonical = LazyCanonical(shipped.config, shipped.tensors)
    keep = [n for n in canonical if not n.startswith("layers.") or n.startswith("layers.0.")]
    tensors = {n: np.asarray(canonical[n]) for n in keep}
    tensors["embed.weight"] = tensors["embed.weight"][:vocab]
    if llama:
        cfg = replace(cfg, family="llama", subln=False, tie_word_embeddings=False)
        tensors = {n: t for n, t in tensors.items() if "sub_norm" not in n}
        tensors["lm_head.weight"] = tensors["embed.weight"][::-1].copy()
    return NativeCheckpoint(cfg, pack_tensors(cfg, tensors), text, CHAT_TEMPLATE, Path("small"))


def gguf_seeds(work: Path) -> list[bytes]:
    from bitnet158.formats.gguf import write_gguf

    header, _ = gguf_split(shipped_gguf(work))
    seeds = [b"\x01" + header]
    for llama, ternary, embedding in [(False, "tq2_0", "f16"), (False, "tq1_0", "q6_k"),
                                      (True, "tq2_0", "q8_0")]:  # fmt: skip
        ckpt = small_checkpoint(llama)
        path = work / f"small-{llama}-{ternary}-{embedding}.gguf"
        write_gguf(path, ckpt, LazyCanonical(ckpt.config, ckpt.tensors), ternary, embedding)
        seeds.append(b"\x00" + path.read_bytes())
    return seeds


def native_seeds(work: Path) -> list[bytes]:
    seeds = [b"\x00" + random_model(work / "tiny.safetensors").read_bytes()]
    for llama in (False, True):
        ckpt = small_checkpoint(llama)
        path = save_native(work / f"small-{llama}.safetensors", ckpt.config, ckpt.tensors,
                           ckpt.tokenizer_json, ckpt.chat_template)  # fmt: skip
        seeds.append(b"\x00" + path.read_bytes())
    header, _ = native_split(SHIPPED_PATH)
    return [*seeds, b"\x01" + header]


@contextlib.contextmanager
def _transformers_on_cpu():
    """As tests/formats/conftest.py: eager BitNet layers, no accelerate needed."""
    from unittest import mock

    import torch
    import transformers.quantizers.quantizer_bitnet as quantizer_bitnet

    with (
        mock.patch.object(quantizer_bitnet, "is_accelerate_available", lambda: True),
        torch._dynamo.config.patch(disable=True),
    ):
        yield


def hf_seeds(work: Path) -> list[bytes]:
    import hf_builders as hb

    builders = {
        "bitnet-packed": hb.make_bitnet_packed,
        "bitnet-sharded": lambda d: hb.make_bitnet_packed(d, shards=2),
        "bitnet-bf16": hb.make_bitnet_bf16,
        "onebitllm": hb.make_onebitllm,
        "llama-bitlinear": hb.make_llama_bitlinear,
        "llama-dequantized": hb.make_llama_dequantized,
        "olmo-bitnet": hb.make_olmo_bitnet,
    }
    text = tokenizer_json().encode()
    seeds = []
    with _transformers_on_cpu():
        for name, build in builders.items():
            directory, _ = build(work / name)
            files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
            files["tokenizer.json"] = text
            seeds.append(pack_files(files))
            # config.json alone: read before the weights, so every mutation lands in it
            seeds.append(pack_files({"config.json": files["config.json"]}))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
              "chat_template": CHAT_TEMPLATE}  # fmt: skip
    files["tokenizer_config.json"] = json.dumps(config).encode()
    files["generation_config.json"] = json.dumps({"eos_token_id": [1, 2]}).encode()
    seeds.append(pack_files(files))
    return seeds


def serve_seeds(work: Path) -> list[bytes]:
    completion, chat = b"\x00", b"\x01"
    bodies = [
        (completion, {"prompt": "ROMEO:", "max_tokens": 3}),
        (completion, {"model": "fuzz-serve", "prompt": ["a", "b"], "max_tokens": 2, "n": 1,
                      "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 1, "stop": ["\n"]}),
        (completion, {"prompt": [5, 6, 7], "stream": True,
                      "stream_options": {"include_usage": True}, "max_tokens": 2}),
        (completion, {"prompt": [[5, 6], [7]], "max_tokens": 1, "repetition_penalty": 1.2,
                      "logprobs": None, "echo": False, "user": "u"}),
        (chat, {"messages": [{"role": "user", "content": "Who art thou?"}], "max_tokens": 2}),
        (chat, {"model": "fuzz-serve", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hail."},
            {"role": "developer", "content": None, "name": "d"}],
            "stream": True, "max_completion_tokens": 3, "n": 2, "stop": "x"}),
        (chat, {"messages": [{"role": "user", "content": "é✓"}], "temperature": 0,
                "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}),
    ]  # fmt: skip
    return [route + json.dumps(body, ensure_ascii=False).encode() for route, body in bodies]


SEEDS = {"gguf": gguf_seeds, "native": native_seeds, "hf": hf_seeds, "serve": serve_seeds}


def write_seeds(out: Path, targets=TARGETS) -> dict[str, int]:
    """Write each target's seeds to out/<target>/; returns how many each has."""
    counts = {}
    for target in targets:
        directory = out / target
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as work:
            seeds = SEEDS[target](Path(work))
        for seed in seeds:
            (directory / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)
        counts[target] = len(seeds)
    return counts


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    chosen = sys.argv[2:] or list(TARGETS)
    unknown = set(chosen) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    for target, n in write_seeds(Path(sys.argv[1]), chosen).items():
        print(f"{target}: {n} seeds", file=sys.stderr)
