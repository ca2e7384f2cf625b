"""OpenAI-compatible HTTP serving with continuous batching (the `serve` extra: fastapi, uvicorn).

bitnet158 serve model.safetensors --port 8000
bitnet158.serve.run_server(bitnet158.load("model.safetensors"), port=8000)
"""

from .config import Limits

__all__ = ["Limits", "create_app", "run_server"]


def __getattr__(name: str):
    # fastapi is imported on first use, so that `Limits` (and --help) work without the extra.
    if name in ("create_app", "run_server"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'bitnet158.serve' has no attribute {name!r}")
