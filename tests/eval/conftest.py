"""Fixtures of the eval tests: a small random SwiGLU+subln model in our format, a text file,
and the shipped model when it is installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engine"))
from engine_fixtures import (  # noqa: E402  (the engine tests' random models and tokenizer)
    CHAT_TEMPLATE,
    TOKENIZER_JSON,
    make_config,
    random_tensors,
)

from bitnet158.formats.convert import SHIPPED_PATH  # noqa: E402
from bitnet158.formats.native import save_native  # noqa: E402

TEXT = (
    "ROMEO: But, soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n"
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?\n"
) * 6


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer llama-b158 (SwiGLU, subln) with random weights and a 64-token context."""
    cfg = make_config("silu-subln-mha", max_position_embeddings=64)
    path = tmp_path_factory.mktemp("eval") / "tiny.safetensors"
    return save_native(path, cfg, random_tensors(cfg), TOKENIZER_JSON, CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "romeo.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    if not SHIPPED_PATH.exists():
        pytest.skip(f"the shipped model is not installed ({SHIPPED_PATH})")
    return SHIPPED_PATH
