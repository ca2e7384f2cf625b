"""A preallocated key/value cache bounded by the context length, with slots for batching."""

from __future__ import annotations

import math

import numpy as np

from .._native import key_tile as KEY_TILE  # positions per tile of a head's keys
from ..errors import GenerationError

KV_DTYPES = ("float32", "float16")


def aligned_zeros(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """A zero-filled C-contiguous array whose data starts on an `align`-byte boundary.

    The pages come from calloc: untouched parts of a large cache cost no memory.
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.zeros(size + align, dtype=np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + size].view(dtype).reshape(shape)


class KVCache:
    """Keys and values [slots, layers, kv_heads, capacity, head_dim], float32 or float16.

    Each slot holds one sequence; `lengths[slot]` of its positions are filled, at most
    `max_context`. `length` is slot 0's, for the common one-sequence case. The capacity is
    max_context rounded up to a multiple of KEY_TILE; the native engine owns the layout of a
    head's keys within it (tiles of KEY_TILE positions).
    """

    def __init__(
        self,
        num_layers: int,
        max_context: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str = "float32",
        slots: int = 1,
    ) -> None:
        if str(np.dtype(dtype)) not in KV_DTYPES:
            raise GenerationError(f"KV cache dtype must be one of {KV_DTYPES}, got {dtype!r}")
        if max_context < 1 or slots < 1:
            raise GenerationError("a KV cache needs max_context >= 1 and slots >= 1")
        capacity = -(-max_context // KEY_TILE) * KEY_TILE
        shape = (slots, num_layers, num_kv_heads, capacity, head_dim)
        try:
            self.k = aligned_zeros(shape, dtype)
            self.v = aligned_zeros(shape, dtype)
        except (MemoryError, ValueError):  # ValueError: numpy's size limit
            gib = 2 * math.prod(shape) * np.dtype(dtype).itemsize / 2**30
            raise GenerationError(
                f"a KV cache of {slots} x {max_context} tokens needs {gib:.3g} GiB, more than "
                "this machine can allocate: load the model with a smaller max_context"
            ) from None
        self.lengths = np.zeros(slots, dtype=np.int64)
        self._max_context = max_context

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def slots(self) -> int:
        return self.k.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def length(self) -> int:
        return int(self.lengths[0])

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[0] = value

    def reserve(self, count: int, slot: int = 0) -> int:
        """Check that `count` more tokens fit in `slot` and return the position of the first one."""
        if not 0 <= slot < self.slots:
            raise GenerationError(f"cache slot {slot} does not exist (the cache has {self.slots})")
        length = int(self.lengths[slot])
        if length + count > self.max_context:
            raise GenerationError(
                f"context overflow: {length} cached + {count} new tokens exceed the "
                f"context length of {self.max_context} tokens (raise max_context or shorten the prompt)"
            )
        return length

    def reset(self, slot: int | None = None) -> None:
        """Forget every slot's tokens, or one slot's (the memory is reused, not cleared)."""
        if slot is None:
            self.lengths[:] = 0
        else:
            self.lengths[slot] = 0
