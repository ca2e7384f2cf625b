"""Fixtures of the format tests; the checkpoint builders are in hf_builders.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def transformers_on_cpu():
    """Run transformers' BitNet layers eagerly and without accelerate.

    Its BitLinear kernels are `torch.compile`d (slow to compile on 2 cores); its quantizer asks
    for accelerate, which only the multi-device loading path uses.
    """
    import transformers.quantizers.quantizer_bitnet as quantizer_bitnet

    mp = pytest.MonkeyPatch()
    mp.setattr(quantizer_bitnet, "is_accelerate_available", lambda: True)
    with torch._dynamo.config.patch(disable=True):  # not monkeypatch: it would delete the key
        yield
    mp.undo()
