"""GGUF vocabularies (`tokenizer.ggml.*`) <-> `tokenizers` tokenizer.json.

- model `gpt2`: byte-level BPE with its merges and llama.cpp's pre-tokenizer name, `gpt-2`
  (tokenizers' ByteLevel regex) or `llama-bpe` (Llama 3's Split regex), both implemented by
  llama.cpp's src/llama-vocab.cpp.
- model `llama`: SentencePiece BPE with byte fallback (Llama 2, 1bitLLM): pieces with
  "▁" for spaces, scores, token types (unknown, control, user-defined, byte); llama.cpp joins
  the adjacent pair whose concatenation is the highest-scoring piece, like SentencePiece.

Token types are llama.cpp's (llama-vocab.h).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError

# llama.cpp token types (llama-vocab.h)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6,
)  # fmt: skip

# Pre-tokenizer regexes of the byte-level BPE flavours we translate both ways. "gpt-2" is
# tokenizers' ByteLevel(use_regex=True) itself; "llama-bpe" is Llama 3's Split regex (its
# tokenizer.json), which llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 implements.
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
GPT2_PRES = ("gpt-2", "default")
SPM_SPACE = "\u2581"  # SentencePiece's visible space
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}  # fmt: skip


def _pre_tokenizer_json(pre: str, where: str) -> dict:
    if pre in GPT2_PRES:
        return _byte_level(True)
    if pre in LLAMA3_PRES:
        split = {
            "type": "Split",
            "pattern": {"Regex": LLAMA3_REGEX},
            "behavior": "Isolated",
            "invert": False,
        }
        return {"type": "Sequence", "pretokenizers": [split, _byte_level(False)]}
    raise FormatError(
        f"{where}: GGUF pre-tokenizer {pre!r} is not supported (bitnet158 rebuilds "
        f"{', '.join(GPT2_PRES + LLAMA3_PRES)})"
    )


def _added_token(i: int, content: str, special: bool) -> dict:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": not special,
        "special": special,
    }


def _bpe_model(vocab: dict[str, int], merges: list[list[str]], **fields) -> dict:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
        **fields,
    }


def _spm_merges(tokens: list[str], scores: np.ndarray, types: list[int], vocab: dict) -> list:
    """BPE merges that reproduce SentencePiece-BPE / llama.cpp's SPM tokenizer.

    That tokenizer repeatedly joins the adjacent pair whose concatenation is the vocabulary
    piece of highest score; a BPE model does the same when every split (a, b) of a piece is a
    merge ranked by the piece's score (ties: lower id first).
    """
    ranked = []
    for i, (piece, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                ranked.append((-float(scores[i]), i, cut, a, b))
    ranked.sort()
    return [[a, b] for *_, a, b in ranked]


def tokenizer_json_from_gguf(metadata: dict[str, Any], where: str) -> str:
    """A tokenizers `tokenizer.json` rebuilt from `tokenizer.ggml.*`.

    Byte-level BPE (`gpt2`: GPT-2 and Llama 3 pre-tokenizers) and SentencePiece BPE with byte
    fallback (`llama`: Llama 2, 1bitLLM) vocabularies.
    """
    model = metadata.get("tokenizer.ggml.model")
    if not isinstance(model, str) or model not in ("gpt2", "llama"):
        raise FormatError(
            f"{where}: GGUF tokenizer model {model!r} is not supported (bitnet158 rebuilds "
            "'gpt2' byte-level BPE and 'llama' SentencePiece vocabularies)"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise FormatError(f"{where}: tokenizer.ggml.tokens is missing")
    types = metadata.get("tokenizer.ggml.token_type")
    types = np.full(len(tokens), TOKEN_NORMAL) if types is None else np.asarray(types)
    if types.shape != (len(tokens),):
        raise FormatError(f"{where}: tokenizer.ggml.token_type does not match the tokens")
    types = types.tolist()
    vocab: dict[str, int] = {}
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append(_added_token(i, tok, special=kind == TOKEN_CONTROL))
        if kind != TOKEN_UNUSED:
            vocab.setdefault(tok, i)
    spec: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": _bos_post_processor(metadata, tokens),
    }
    if model == "gpt2":
        merges = metadata.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise FormatError(f"{where}: tokenizer.ggml.merges is missing")
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep or a not in vocab or b not in vocab:
                raise FormatError(f"{where}: tokenizer merge {m!r} does not join two tokens")
            pairs.append([a, b])
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str):
            raise FormatError(f"{where}: tokenizer.ggml.pre is not a string")
        spec["pre_tokenizer"] = _pre_tokenizer_json(pre, where)
        spec["decoder"] = _byte_level(True)
        # Llama 3's tokenizer.json ignores merges for whole-vocabulary words, as llama.cpp does
        spec["model"] = _bpe_model(vocab, pairs, ignore_merges=pre in LLAMA3_PRES)
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        numeric = isinstance(scores, np.ndarray) and scores.dtype.kind in "fiu"
        if not numeric or scores.shape != (len(tokens),):
            raise FormatError(
                f"{where}: tokenizer.ggml.scores is missing, not numbers or the wrong size"
            )
        unknown = [t for t, k in zip(tokens, types, strict=True) if k == TOKEN_UNKNOWN]
        # SentencePiece: spaces are "▁"; llama.cpp adds one before the text unless told not to
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}
        prepend = [{"type": "Prepend", "prepend": SPM_SPACE}] if prefix else []
        spec["normalizer"] = {"type": "Sequence", "normalizers": [*prepend, replace]}
        strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else []
        spec["decoder"] = {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                *strip,
            ],
        }
        merges = _spm_merges(tokens, np.asarray(scores), types, vocab)
        spec["model"] = _bpe_model(
            vocab,
            merges,
            unk_token=unknown[0] if unknown else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    text = json.dumps(spec, ensure_ascii=False)
    try:
        import tokenizers

        tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises bare Exceptions
        raise FormatError(f"{where}: the GGUF tokenizer cannot be rebuilt ({exc})") from None
    return text


def _bos_post_processor(metadata: dict[str, Any], tokens: list[str]) -> dict | None:
    """Prepend BOS on encode(add_special_tokens=True) when llama.cpp would (add_bos_token)."""
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") is not True:
        return None
    if not isinstance(bos, int) or isinstance(bos, bool) or not 0 <= bos < len(tokens):
        return None
    special = {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}
    first = {"SpecialToken": {"id": tokens[bos], "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            first,
            {"Sequence": {"id": "A", "type_id": 0}},
            first,
            {"Sequence": {"id": "B", "type_id": 1}},
        ],  # fmt: skip
        "special_tokens": special,
    }


@dataclass
class GGUFVocab:
    """What `tokenizer.ggml.*` needs, taken from a tokenizer.json."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    tokens: list[str]
    types: list[int]
    merges: list[str]  # gpt2 only
    pre: str | None = None  # gpt2 only
    scores: list[float] | None = None  # llama only
    add_space_prefix: bool = True  # llama only


def vocab_from_tokenizer_json(text: str, vocab_size: int) -> GGUFVocab:
    """A BPE tokenizer.json -> GGUF vocabulary: byte-level ('gpt2') or byte-fallback ('llama')."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"tokenizer.json is not valid JSON ({exc})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise FormatError(
            f"only BPE tokenizers can be written to GGUF by bitnet158 (this one is "
            f"{model.get('type')!r})"
        )
    spm = bool(model.get("byte_fallback"))
    if spm:
        add_space_prefix = _spm_prefix(spec)
    elif spec.get("normalizer"):
        raise FormatError("a byte-level BPE tokenizer with a normalizer has no GGUF equivalent")
    tokens: list[str | None] = [None] * vocab_size
    for tok, i in model.get("vocab", {}).items():
        if 0 <= i < vocab_size:
            tokens[i] = tok
    types = [TOKEN_NORMAL] * vocab_size
    for t in spec.get("added_tokens") or []:
        i = t["id"]
        if 0 <= i < vocab_size:
            tokens[i] = t["content"]
            types[i] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    for i, tok in enumerate(tokens):
        if tok is None:  # ids the embedding has but the tokenizer never produces
            tokens[i], types[i] = f"[PAD{i}]", TOKEN_UNUSED
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    if not spm:
        merges = [" ".join(pair) for pair in pairs]
        return GGUFVocab("gpt2", tokens, types, merges, pre=_pre_name(spec.get("pre_tokenizer")))  # type: ignore[arg-type]
    # SentencePiece BPE: byte pieces, the unknown piece, and scores that rank each merge's
    # result by its merge order (llama.cpp joins the pair whose result scores highest)
    ids = {tok: i for i, tok in enumerate(tokens)}
    for i, tok in enumerate(tokens):
        if types[i] == TOKEN_NORMAL and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):  # fmt: skip
            types[i] = TOKEN_BYTE
    if model.get("unk_token") in ids:
        types[ids[model["unk_token"]]] = TOKEN_UNKNOWN
    scores = [0.0] * vocab_size
    ranked: set[int] = set()
    for rank, (a, b) in enumerate(pairs):
        i = ids.get(a + b)
        if i is not None and i not in ranked:
            scores[i] = -float(rank)
            ranked.add(i)
    return GGUFVocab("llama", tokens, types, [], scores=scores, add_space_prefix=add_space_prefix)  # type: ignore[arg-type]


def _spm_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json adds "▁" before the text, or FormatError.

    Two spellings: transformers' legacy Llama (normalizer Prepend("▁") + Replace(" ", "▁"))
    and the Metaspace pre-tokenizer (replacement "▁", prepend_scheme first/always/never).
    """
    norm = spec.get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = [p.get("type") for p in parts if p]
    replaces = any(
        p.get("type") == "Replace"
        and p.get("pattern", {}).get("String") == " "
        and p.get("content") == SPM_SPACE
        for p in parts
    )
    pre = spec.get("pre_tokenizer") or {}
    if replaces and set(kinds) <= {"Prepend", "Replace"} and not pre:
        return any(p.get("type") == "Prepend" and p.get("prepend") == SPM_SPACE for p in parts)
    if not kinds and pre.get("type") == "Metaspace" and pre.get("replacement") == SPM_SPACE:
        if pre.get("split", False):
            raise FormatError("a Metaspace pre-tokenizer that splits words has no GGUF equivalent")
        return pre.get("prepend_scheme", "always") != "never"
    raise FormatError(
        "this byte-fallback tokenizer's normalizer / pre-tokenizer is not SentencePiece's "
        '(" " -> "▁", optionally a leading "▁"): no GGUF equivalent bitnet158 knows'
    )


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name of a tokenizer.json pre_tokenizer, or FormatError."""
    pre = pre or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise FormatError("ByteLevel with add_prefix_space has no llama.cpp pre-tokenizer")
        return "gpt-2"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (
        parts
        and len(parts) == 2
        and parts[0].get("type") == "Split"
        and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_REGEX
        and parts[1].get("type") == "ByteLevel"
        and not parts[1].get("use_regex", True)
    ):
        return "llama-bpe"
    raise FormatError(
        f"tokenizer pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent that "
        "bitnet158 knows (GPT-2 ByteLevel or Llama 3's Split + ByteLevel)"
    )
