"""bitnet158: train, run, convert and measure 1.58-bit BitNet b1.58 language models."""

__version__ = "0.1.0"

__all__ = ["load", "Model", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `import bitnet158` stays light (no numpy/tokenizers work).
    if name in ("load", "Model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bitnet158' has no attribute {name!r}")
