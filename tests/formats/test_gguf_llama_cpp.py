"""Proof that our GGUF files run in llama.cpp as the model we run: llama-cpp-python against us.

llama-cpp-python (a test extra; it compiles the llama.cpp it bundles) loads the files we
write, tokenizes like our tokenizer, and computes the same next tokens. llama.cpp quantizes
activations per block of 256 values (q8_K) where BitNet quantizes per token, and stores the
weight scale as fp16: logits differ slightly, the chosen tokens should not.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_gguf import (  # noqa: F401 (spm_gguf is a fixture)
    GPT2_TOKENIZER,
    LLAMA_BITNET,
    SAMPLES,
    SPM_SAMPLES,
    TEMPLATE,
    make_config,
    random_tensors,
    spm_gguf,
)

import bitnet158
from bitnet158.formats.convert import SHIPPED_PATH, convert, read_checkpoint
from bitnet158.formats.gguf import write_gguf
from bitnet158.formats.native import save_native, unpack_tensors

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

PROMPTS = [
    "ROMEO:",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING HENRY V:\nOnce more unto the breach, dear friends,",
    "HAMLET:\nTo be, or not to be, that is the question:",
    "JULIET:\nO Romeo, Romeo! wherefore art thou",
]
# Julius Caesar, the play the shipped model never saw (scripts/train_shipped_model.py HELD_OUT).
HELD_OUT = """ANTONY:
Friends, Romans, countrymen, lend me your ears;
I come to bury Caesar, not to praise him.
The evil that men do lives after them;
The good is oft interred with their bones;
So let it be with Caesar. The noble Brutus
Hath told you Caesar was ambitious:
If it were so, it was a grievous fault,
And grievously hath Caesar answer'd it.
Here, under leave of Brutus and the rest--
For Brutus is an honourable man;
So are they all, all honourable men--
Come I to speak in Caesar's funeral.
He was my friend, faithful and just to me:
But Brutus says he was ambitious;
And Brutus is an honourable man.
He hath brought many captives home to Rome
Whose ransoms did the general coffers fill:
Did this in Caesar seem ambitious?
When that the poor have cried, Caesar hath wept:
Ambition should be made of sterner stuff:
Yet Brutus says he was ambitious;
And Brutus is an honourable man.
"""
NEW_TOKENS = 16


def llama(path) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2, seed=0
    )


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def greedy_ours(model, ids: list[int]) -> list[int]:
    ids = list(ids)
    for _ in range(NEW_TOKENS):
        ids.append(int(model.logits(ids)[-1].argmax()))
    return ids[-NEW_TOKENS:]


def greedy_llama(llm, ids: list[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("ttype", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("arch", ["bitnet", "llama"])
def test_random_model_runs_in_llama_cpp(tmp_path, ttype, arch):
    """Sub-norms -> llama.cpp's bitnet graph; none (Falcon-E style, GQA, untied) -> llama."""
    cfg = make_config(num_kv_heads=4) if arch == "bitnet" else make_config(**LLAMA_BITNET)
    src = save_native(
        tmp_path / "m.safetensors", cfg, random_tensors(cfg, seed=5), GPT2_TOKENIZER, TEMPLATE
    )
    convert(src, tmp_path / "m.gguf", to=f"gguf-{ttype}")
    llm, ours = llama(tmp_path / "m.gguf"), bitnet158.load(src)
    ids = list(range(3, 60, 3))
    theirs, mine = llama_logits(llm, ids), ours.logits(ids)
    assert np.array_equal(theirs.argmax(-1), mine.argmax(-1))
    # Measured: 2.1% (bitnet; its sub-norm outputs meet llama.cpp's per-block activation
    # quantization) and 0.2% (llama). Rotating the wrong RoPE pairs measured 7% and 1.7%.
    error = np.linalg.norm(theirs - mine) / np.linalg.norm(mine - mine.mean(-1, keepdims=True))
    assert error < {"bitnet": 0.04, "llama": 0.01}[arch]
    if ttype == "tq2_0":  # a Q6_K embedding (and output): llama.cpp reads what we read
        convert(src, tmp_path / "q6k.gguf", to="gguf-tq2_0", embedding_type="q6_k")
        q6k = llama_logits(llama(tmp_path / "q6k.gguf"), ids)
        ours_q6k = bitnet158.load(tmp_path / "q6k.gguf").logits(ids)
        spread = np.linalg.norm(ours_q6k - ours_q6k.mean(-1, keepdims=True))
        assert np.linalg.norm(q6k - ours_q6k) / spread < 0.04
        assert (q6k.argmax(-1) == ours_q6k.argmax(-1)).mean() >= 0.9
    for text in SAMPLES[:5]:  # llama.cpp's tokenizer from our metadata = our tokenizer
        want = ours.tokenizer.encode(text, add_bos=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text


def test_sentencepiece_vocab_tokenizes_in_llama_cpp_like_sentencepiece(tmp_path, spm_gguf):  # noqa: F811
    """A 1bitLLM-style vocabulary as we write it: llama.cpp tokenizes as SentencePiece does."""
    sp, path = spm_gguf
    ckpt = read_checkpoint(path)
    write_gguf(tmp_path / "m.gguf", ckpt, unpack_tensors(ckpt.config, ckpt.tensors))
    llm = llama(tmp_path / "m.gguf")
    for text in SPM_SAMPLES:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1, *sp.encode(text)]


@pytest.fixture(scope="module", params=["tq2_0", "tq1_0"])
def shipped_gguf(request, tmp_path_factory):
    if not SHIPPED_PATH.exists():
        pytest.skip("the shipped model is not built yet (make shipped-model)")
    out = tmp_path_factory.mktemp("shipped") / f"shakespeare-b158.{request.param}.gguf"
    convert(SHIPPED_PATH, out, to=f"gguf-{request.param}")
    return out


@pytest.fixture(scope="module")
def shipped_pair(shipped_gguf):
    return bitnet158.load(SHIPPED_PATH), llama(shipped_gguf)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_shipped_model_greedy_continuation_matches(shipped_pair, prompt):
    ours, llm = shipped_pair
    ids = ours.tokenizer.encode(prompt, add_bos=True)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
    assert greedy_llama(llm, ids) == greedy_ours(ours, ids)


def test_shipped_model_top1_agrees_on_held_out_text(shipped_pair):
    ours, llm = shipped_pair
    ids = ours.tokenizer.encode(HELD_OUT, add_bos=True)
    assert len(ids) > 150
    agree = (llama_logits(llm, ids).argmax(-1) == ours.logits(ids).argmax(-1)).mean()
    assert agree >= 0.95, f"top-1 agreement {agree:.3f} on {len(ids)} positions"  # measured 0.9925
