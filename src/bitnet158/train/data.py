"""Token data for training: text files tokenized into a flat memory-mapped array of token ids,
and deterministic batches that depend only on (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm


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
