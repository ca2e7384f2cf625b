"""Helpers of the kernel tests."""

import numpy as np


def exact_matmul(x_q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """x_q . codes^T as int32, exactly (float64 BLAS: every partial sum is an integer far below
    2^53)."""
    return (x_q.astype(np.float64) @ codes.astype(np.float64).T).astype(np.int32)
