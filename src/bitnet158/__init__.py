"""bitnet158: train, run, convert and measure 1.58-bit BitNet b1.58 language models."""

__version__ = "0.1.0"
