"""A preallocated key/value cache bounded by the context length."""

from __future__ import annotations

import numpy as np

from ..errors import GenerationError


class KVCache:
    """Keys and values float32[layers, max_context, kv_heads, head_dim]; `length` tokens filled."""

    def __init__(self, num_layers: int, max_context: int, num_kv_heads: int, head_dim: int) -> None:
        shape = (num_layers, max_context, num_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)  # zero pages cost nothing until written
        self.v = np.zeros(shape, dtype=np.float32)
        self.length = 0

    @property
    def max_context(self) -> int:
        return self.k.shape[1]

    def reserve(self, count: int) -> int:
        """Check that `count` more tokens fit and return the position of the first one."""
        if self.length + count > self.max_context:
            raise GenerationError(
                f"context overflow: {self.length} cached + {count} new tokens exceed the "
                f"context length of {self.max_context} tokens (raise max_context or shorten the prompt)"
            )
        return self.length

    def update(
        self, layer: int, start: int, k: np.ndarray, v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v float32[T, kv_heads, head_dim] at `start`; return keys, values [start+T, ...]."""
        end = start + k.shape[0]
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def reset(self) -> None:
        self.length = 0
