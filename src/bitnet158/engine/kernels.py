"""Threads and ISA of the native kernels, and one ternary projection on its own.

The engine runs whole decoder steps in C++ (model.py); `TernaryLinear` is a single BitLinear
through `_native.bitlinear`, whose numpy definition is `quant.ternary_linear_reference` (the
native kernel matches it bit for bit: tests/engine/test_engine_model.py).
"""

from __future__ import annotations

import numpy as np

from .. import _native
from .model import native_array


def set_num_threads(threads: int | None) -> None:
    """Threads used by the native kernels (None: the extension's default, all cores)."""
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    _native.set_num_threads(threads)


def isa() -> str:
    """The instruction set the kernels run on: amx (the avx512 kernels with AMX tiles for
    prefill), avx512, avx2 or scalar."""
    return _native.isa()


class TernaryLinear:
    """One projection y = x W^T with W ternary, packed in our layout, and its own beta."""

    def __init__(self, packed: np.ndarray, beta: float, n: int, k: int) -> None:
        self.packed = native_array(packed, np.uint8)  # a memory-mapped view
        self.beta, self.n, self.k = float(beta), n, k

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x float32[T, K] -> float32[T, N]: per-token int8 x, exact integer dot products."""
        return _native.bitlinear(
            native_array(x, np.float32), self.packed, self.beta, self.n, self.k
        )
