"""OpenAI-compatible HTTP serving with continuous batching (the `serve` extra: fastapi, uvicorn).

bitnet158 serve model.safetensors --port 8000
python -c "import bitnet158.serve as s; s.run_server('model.safetensors')"
"""

from .app import Limits, create_app, run_server

__all__ = ["Limits", "create_app", "run_server"]
