"""Token data for training: text and JSON-lines files tokenized into memory-mapped token
shards (with a progress bar), and deterministic batches that depend only on (seed, step), so
a resumed or re-launched run sees the same data without storing a data-loader state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import FormatError


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 65536 else np.uint32


def tokenize_files(
    paths: Iterable[Path],
    encode: Callable[[str], list[int]],
    vocab_size: int,
    eos_id: int | None,
    out_path: Path,
) -> np.ndarray:
    """Tokenize text files (each followed by `eos_id`) into `out_path` as uint16/uint32 ids."""
    ids: list[int] = []
    for path in tqdm(list(paths), desc="tokenize", unit="file"):
        ids.extend(encode(Path(path).read_text(encoding="utf-8")))
        if eos_id is not None:
            ids.append(eos_id)
    tokens = np.asarray(ids, dtype=token_dtype(vocab_size))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tokens.tofile(tmp)
    tmp.replace(out_path)
    return tokens


def load_tokens(path: Path, dtype: type = np.uint16) -> np.ndarray:
    """Memory-map a token file written by tokenize_files."""
    return np.memmap(path, dtype=dtype, mode="r")


def batch_at(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets int64[batch, seq_len] for `step`, a pure function of its arguments."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for sequences of {seq_len}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    window = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    return window[:, :-1], window[:, 1:]


# --- documents and token shards ---------------------------------------------------------------

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TOKENS_FORMAT = "bitnet158-tokens"


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file; FormatError on bad lines."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise FormatError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def read_documents(paths: Iterable[Path], field: str = "text") -> Iterator[str]:
    """The documents of text files (one per file) and JSON-lines files (`field` of each line)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: no such file")
        if path.suffix in JSONL_SUFFIXES:
            for lineno, obj in read_jsonl(path):
                text = obj.get(field)
                if not isinstance(text, str):
                    raise FormatError(
                        f"{path}:{lineno}: no string field {field!r} (fields: {sorted(obj)[:6]})"
                    )
                yield text
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise FormatError(f"{path}: not UTF-8 text ({exc})") from None


@dataclass
class TokenizeStats:
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0  # documents with no tokens
    shards: int = 0


def _inputs_signature(paths: list[Path], field: str) -> list[list]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, field] for p in paths]


def tokenize_to_shards(
    paths: Iterable[Path],
    encode: Callable[[str], list[int]],
    vocab_size: int,
    eos_id: int | None,
    out_dir: Path,
    field: str = "text",
    shard_tokens: int = 1 << 24,
    progress: bool = True,
) -> TokenizeStats:
    """Tokenize text / JSON-lines files into memory-mappable shards `shard-NNNNN.bin` + index.json.

    Every document is followed by `eos_id`; empty documents are skipped and counted. A
    directory already holding the shards of the same inputs (paths, sizes, times) is reused.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise FormatError("no input files to tokenize")
    for p in paths:
        if not p.is_file():
            raise FormatError(f"{p}: no such file")
    out_dir = Path(out_dir)
    signature = _inputs_signature(paths, field)
    index_path = out_dir / "index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("inputs") == signature and index.get("vocab_size") == vocab_size:
            return TokenizeStats(**index["stats"])
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(token_dtype(vocab_size))
    stats = TokenizeStats()
    shards: list[dict] = []
    buffer: list[int] = []

    def flush() -> None:
        name = f"shard-{len(shards):05d}.bin"
        tmp = out_dir / (name + ".tmp")
        np.asarray(buffer, dtype=dtype).tofile(tmp)
        tmp.replace(out_dir / name)
        shards.append({"file": name, "tokens": len(buffer)})
        buffer.clear()

    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    for path in paths:
        for text in read_documents([path], field):
            ids = encode(text) if text else []
            if not ids:
                stats.skipped_empty += 1
                continue
            bad = next((i for i in ids if not 0 <= i < vocab_size), None)
            if bad is not None:
                raise FormatError(
                    f"{path}: token id {bad} is outside the vocabulary ({vocab_size})"
                )
            buffer.extend(ids)
            if eos_id is not None:
                buffer.append(eos_id)
            stats.documents += 1
            stats.tokens += len(ids) + (eos_id is not None)
            if len(buffer) >= shard_tokens:
                flush()
        bar.update(path.stat().st_size)
    bar.close()
    if buffer:
        flush()
    if stats.tokens == 0:
        raise FormatError(f"no tokens in {len(paths)} file(s): every document is empty")
    stats.shards = len(shards)
    index = {
        "format": TOKENS_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "shards": shards,
        "inputs": signature,
        "stats": asdict(stats),
    }
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(index_path)
    return stats


class TokenShards:
    """The shards of a token directory as one read-only sequence: len() and slicing, like an array."""

    def __init__(self, directory: Path, start: int = 0, stop: int | None = None) -> None:
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise FormatError(
                f"{self.directory}: no index.json (make it with `bitnet158 tokenize`)"
            )
        try:
            index = json.loads(index_path.read_text())
            assert index["format"] == TOKENS_FORMAT
            dtype = np.dtype(index["dtype"])
            self.vocab_size = int(index["vocab_size"])
            self.shards = [np.memmap(self.directory / s["file"], dtype=dtype, mode="r")
                           for s in index["shards"]]  # fmt: skip
        except (ValueError, KeyError, TypeError, AssertionError, OSError) as exc:
            raise FormatError(f"{index_path}: not a valid token index ({exc!r})") from None
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.start, self.stop = start, int(self.offsets[-1]) if stop is None else stop

    def window(self, start: int, stop: int) -> TokenShards:
        """Tokens [start, stop) of this sequence, without copying."""
        view = TokenShards.__new__(TokenShards)
        view.__dict__.update(self.__dict__)
        view.start, view.stop = self.start + start, self.start + stop
        return view

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards supports contiguous slices only")
        lo, hi, _ = key.indices(len(self))
        lo, hi = lo + self.start, max(lo, hi) + self.start
        parts = []
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        for i in range(max(first, 0), len(self.shards)):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if a >= hi:
                break
            parts.append(self.shards[i][max(lo, a) - a : min(hi, b) - a])
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0)


def split_holdout(tokens, n_val: int):
    """(train, held-out): the last `n_val` tokens are held out."""
    if not 0 < n_val < len(tokens):
        raise ValueError(f"cannot hold out {n_val} of {len(tokens)} tokens")
    cut = len(tokens) - n_val
    if isinstance(tokens, TokenShards):
        return tokens.window(0, cut), tokens.window(cut, len(tokens))
    return tokens[:cut], tokens[cut:]
