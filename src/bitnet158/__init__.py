"""bitnet158: train, run, convert and measure 1.58-bit BitNet b1.58 language models."""

__version__ = "0.1.0"

__all__ = ["load", "Model", "BitNet", "quantize_model", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `import bitnet158` stays light (no numpy/tokenizers work).
    if name in ("load", "Model"):
        from . import api

        return getattr(api, name)
    if name == "BitNet":  # the torch reference model: needs the `train` extra (torch)
        from .nn.pretrained import BitNet

        return BitNet
    if name == "quantize_model":  # fp16 -> BitNet b1.58 conversion: needs torch as well
        from .nn.convert import quantize_model

        return quantize_model
    raise AttributeError(f"module 'bitnet158' has no attribute {name!r}")
