"""Fixtures of the engine tests: every model variant saved in our file format."""

from __future__ import annotations

import pytest
from engine_fixtures import CHAT_TEMPLATE, CONFIGS, TOKENIZER_JSON, make_config, random_tensors

from bitnet158.formats.native import save_native


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, tuple]:
    """name -> (path of our file, config, canonical tensors), one per variant."""
    out = {}
    root = tmp_path_factory.mktemp("models")
    for name in CONFIGS:
        cfg = make_config(name)
        tensors = random_tensors(cfg)
        path = save_native(
            root / f"{name}.safetensors", cfg, tensors, TOKENIZER_JSON, CHAT_TEMPLATE
        )
        out[name] = (path, cfg, tensors)
    return out


@pytest.fixture(params=list(CONFIGS))
def variant(request, model_files):
    """(path, config, tensors) of each variant in turn."""
    return model_files[request.param]


@pytest.fixture(scope="session")
def tiny_path(model_files):
    """The file of one variant, for generation tests."""
    return model_files["relu2-subln-gqa-tied"][0]
