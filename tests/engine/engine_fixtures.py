"""Helpers of the engine tests: small random models and a byte-level BPE tokenizer."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bitnet158.config import ModelConfig
from bitnet158.nn.model import Transformer

SPECIALS = ["<s>", "</s>", "<|eot_id|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "ROMEO: But, soft! what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
    "It is the east, and Juliet is the sun. Café, naïve, smörgåsbord ✓",
] * 20

# The variants the engine must reproduce (small: 2 layers, H = 64).
CONFIGS = {
    "relu2-subln-gqa-tied": dict(
        family="bitnet-2b4t", hidden_act="relu2", num_kv_heads=2, tie_word_embeddings=True
    ),
    "silu-subln-mha": dict(hidden_act="silu", num_kv_heads=4),
    "llama-untied": dict(
        family="llama", hidden_act="silu", num_kv_heads=4, subln=False, tie_word_embeddings=False
    ),
    "olmo-inner-norm-layernorm": dict(
        family="olmo-bitnet",
        hidden_act="silu",
        num_kv_heads=4,
        subln=False,
        inner_norm=True,
        norm_kind="layernorm",
        norm_affine=False,
    ),
    # head_dim 20: not a multiple of the 16 lanes of the AVX-512 attention (1bitLLM 3B has 100)
    "head-dim-20": dict(hidden_act="relu2", hidden_size=80, num_kv_heads=2),
}


def build_tokenizer_json() -> str:
    """A byte-level BPE tokenizer (every string encodes; multi-byte characters span tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


TOKENIZER_JSON = build_tokenizer_json()
VOCAB = Tokenizer.from_str(TOKENIZER_JSON).get_vocab_size()


def make_config(name: str, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_ids=[1],
    )
    fields.update(CONFIGS[name])
    fields.update(overrides)
    return ModelConfig(**fields)


def random_tensors(cfg: ModelConfig, seed: int = 3) -> dict[str, np.ndarray]:
    """Canonical tensors of a random model; norm weights away from 1 so that they matter."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.to_tensors()
