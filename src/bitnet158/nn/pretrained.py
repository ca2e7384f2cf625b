"""`BitNet.from_pretrained`: the torch reference model with a transformers-like surface.

from bitnet158 import BitNet
model = BitNet.from_pretrained("microsoft/bitnet-b1.58-2B-4T")   # or a local path
inputs = model.tokenizer("Hello, world!", return_tensors="pt")
outputs = model(**inputs)            # outputs.logits: float32[B, T, vocab]
ids = model.generate(**inputs, max_new_tokens=20)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..api import checkpoint_tokenizer
from ..errors import FormatError
from ..formats.convert import SHIPPED_NAME, read_checkpoint
from ..formats.native import unpack_tensors
from ..formats.tokenizer import Tokenizer
from .model import Transformer


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class HFStyleTokenizer:
    """Wraps our Tokenizer so that `tokenizer(text, return_tensors="pt")` works as in transformers."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.inner = tokenizer

    def __call__(
        self, text: str | list[str], return_tensors: str | None = None, add_bos: bool = True
    ) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.inner.encode(t, add_bos=add_bos) for t in texts]
        if return_tensors is None:
            return {"input_ids": ids[0] if isinstance(text, str) else ids}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        width = max(len(i) for i in ids)
        pad = self.inner.eos_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):  # left padding, as generation wants
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _resolve(name_or_path: str | os.PathLike | None) -> str | Path | None:
    """A local path, the shipped name, or a hub id fetched with huggingface_hub when possible."""
    if name_or_path is None or str(name_or_path) == SHIPPED_NAME or Path(name_or_path).exists():
        return name_or_path
    if str(name_or_path).count("/") != 1:
        raise FormatError(
            f"{name_or_path}: not a local path, '{SHIPPED_NAME}', or an 'owner/name' hub id"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FormatError(
            f"{name_or_path}: not a local path, and huggingface_hub is not installed "
            "to download it (pip install huggingface_hub)"
        ) from None
    try:
        return snapshot_download(
            str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.jinja"]
        )
    except Exception as exc:  # network errors come in many classes
        raise FormatError(
            f"{name_or_path}: could not download from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); download it elsewhere and pass the local directory"
        ) from None


class BitNet(nn.Module):
    """Reference BitNet b1.58 model (torch) loaded from any supported checkpoint."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: Path) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.tokenizer = HFStyleTokenizer(tokenizer)
        self.path = path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None) -> BitNet:
        ckpt = read_checkpoint(_resolve(name_or_path))
        tensors = unpack_tensors(ckpt.config, ckpt.tensors, ckpt.layout)
        model = Transformer.from_tensors(ckpt.config, tensors).eval()
        return cls(model, checkpoint_tokenizer(ckpt), Path(ckpt.path))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padded batches are not supported by the reference model; pass one sequence at a time"
            )
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt plus new tokens, int64[B, T + new] (greedy unless do_sample); recomputes, no cache."""
        ids = input_ids
        eos = set(self.config.eos_token_ids)
        for _ in range(max_new_tokens):
            logits = self.forward(ids, attention_mask).logits[:, -1]
            if do_sample:
                logits = logits / max(temperature, 1e-6)
                if top_k:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            attention_mask = None if attention_mask is None else torch.ones_like(ids)
            if ids.shape[0] == 1 and nxt.item() in eos:
                break
        return ids
