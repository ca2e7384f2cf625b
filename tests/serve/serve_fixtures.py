"""Helpers of the serving tests: a small random model built with numpy, a server thread."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bitnet158.config import ModelConfig
from bitnet158.formats.native import expected_shapes, projection_shapes, save_native
from bitnet158.serve.batching import EngineBackend

SPECIALS = ["<s>", "</s>", "<|eot_id|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "ROMEO: But, soft! what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
    "It is the east, and Juliet is the sun. Café, naïve ✓",
] * 20


def tokenizer_json() -> str:
    """A byte-level BPE tokenizer: every string encodes, multi-byte characters span tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def random_model(path, context: int = 256, seed: int = 0):
    """Write a 2-layer random bitnet-2b4t-style model (GQA, relu2, subln, tied) to `path`."""
    text = tokenizer_json()
    cfg = ModelConfig(
        vocab_size=Tokenizer.from_str(text).get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        family="bitnet-2b4t",
        hidden_act="relu2",
        max_position_embeddings=context,
        bos_token_id=0,
        eos_token_ids=[1],
    )
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(".packed"):
            proj = name.rsplit(".", 2)[1]
            stem = name.removesuffix(".packed")
            tensors[stem + ".codes"] = rng.integers(-1, 2, projection_shapes(cfg)[proj], np.int8)
        elif name.endswith(".scale"):
            tensors[name] = np.float32(rng.uniform(0.5, 1.5))
        elif name.endswith("norm.weight"):
            tensors[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = rng.standard_normal(shape).astype(np.float32)
    return save_native(path, cfg, tensors, text, CHAT_TEMPLATE)


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a thread of the test process."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class SlowBackend(EngineBackend):
    """The engine backend with a pause per step, so requests stay in flight a while."""

    def __init__(self, *args, pause: float = 0.02, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pause = pause

    def step(self, work):
        time.sleep(self.pause)
        return super().step(work)
