"""The server's limits: one dataclass, importable without the `serve` extra (for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """What one request may ask for, and how much work the server takes on."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # per choice
    max_n: int = 8  # choices per request (times prompts, for a list of prompts)
    max_waiting: int = 64  # sequences queued for a batch slot; beyond: HTTP 429
    slots: int = 16  # sequences decoded together (the batch size)
