"""BitNet.from_pretrained (torch) on the shipped model, against the torch-free engine."""

import numpy as np
import pytest
import torch

import bitnet158
from bitnet158 import BitNet
from bitnet158.errors import FormatError


@pytest.fixture(scope="module")
def shipped():
    return BitNet.from_pretrained("shakespeare-b158")


def test_transformers_like_call_matches_the_engine(shipped):
    inputs = shipped.tokenizer("To be, or not to be, that is the question", return_tensors="pt")
    with torch.no_grad():
        logits = shipped(**inputs).logits[0].numpy()
    engine = bitnet158.load().logits(inputs["input_ids"][0].tolist())
    scale = np.abs(engine).max()
    assert np.abs(logits - engine).max() <= 1e-4 * scale
    assert (logits.argmax(-1) == engine.argmax(-1)).all()


def test_generate_greedy_matches_the_engine(shipped):
    inputs = shipped.tokenizer("ROMEO:", return_tensors="pt")
    ids = shipped.generate(**inputs, max_new_tokens=12)
    model = bitnet158.load()
    text = model.generate("ROMEO:", max_new_tokens=12, temperature=0)
    assert shipped.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :]) == text


def test_labels_give_the_language_model_loss(shipped):
    inputs = shipped.tokenizer("Friends, Romans, countrymen", return_tensors="pt")
    out = shipped(**inputs, labels=inputs["input_ids"])
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], inputs["input_ids"][0, 1:])
    torch.testing.assert_close(out.loss, ref)


def test_unknown_name_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FormatError, match="no-such-owner/no-such-model"):
        BitNet.from_pretrained("no-such-owner/no-such-model")
