"""Sliding-window perplexity: the window arithmetic, a formula check, engine vs torch, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from bitnet158.cli import main
from bitnet158.eval.perplexity import perplexity, relative_difference, sliding_windows
from bitnet158.eval.scoring import TokenScores, make_scorer, target_scores


@pytest.mark.parametrize(
    "n, context, stride",
    [(2, 1, 1), (10, 4, 4), (10, 4, 1), (100, 16, 5), (17, 16, 8), (16, 16, 8), (5, 64, 32)],
)
def test_windows_score_every_target_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    targets = [t for w in windows for t in range(w.first, w.end)]
    assert targets == list(range(1, n))
    for i, w in enumerate(windows):
        assert w.end - w.begin <= context + 1  # the model sees end - begin - 1 <= context tokens
        assert w.begin == i * stride
        if i:  # every target has at least context - stride tokens of history in its window
            assert w.first - w.begin >= context - stride + 1


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError):
        sliding_windows(10, 0, 1)


def test_target_scores_is_a_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32) * 4
    targets = np.array([3, 0, 10, 7, 7])
    s = target_scores(logits, targets)
    z = logits.astype(np.float64)
    want = z[np.arange(5), targets] - np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(s.logprobs, want, rtol=1e-12)
    assert list(s.greedy) == list(logits.argmax(-1) == targets)


class RecordingScorer:
    """A scorer whose log p(next) is a function of the history length, to check the windows."""

    backend, path, max_context = "fake", "fake", 8

    class tokenizer:  # noqa: N801
        @staticmethod
        def encode(text, add_bos=True):
            return list(range(len(text)))

    def __init__(self):
        self.seen = []

    def score(self, batch):
        self.seen += [list(ids) for ids in batch]
        return [
            TokenScores(-np.arange(1.0, len(ids)), np.zeros(len(ids) - 1, bool)) for ids in batch
        ]


def test_perplexity_sums_new_targets_with_their_window_history(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x" * 30)
    scorer = RecordingScorer()
    r = perplexity(scorer, [path], context=8, stride=3, batch_size=2)
    # the j-th target of a window (j = 1..) costs j nats; collect what each window adds
    want = 0.0
    for w in sliding_windows(30, 8, 3):
        want += sum(range(w.first - w.begin, w.end - w.begin))
    assert r.scored == 29 and math.isclose(r.nll, want)
    assert math.isclose(r.ppl, math.exp(want / 29))
    assert all(len(ids) <= 9 for ids in scorer.seen)


def test_engine_perplexity_matches_one_forward(tiny_model, text_file):
    """With one window, perplexity is exp(mean NLL) of the model's own logits."""
    scorer = make_scorer(tiny_model, "engine", threads=1)
    ids = scorer.tokenizer.encode(text_file.read_text(), add_bos=True)[:40]
    text = scorer.tokenizer.decode(ids[1:])
    short = text_file.parent / "short.txt"
    short.write_text(text, encoding="utf-8")
    ids = scorer.tokenizer.encode(text, add_bos=True)
    logits = scorer.model.logits(ids[:-1]).astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
    r = perplexity(scorer, [short], context=len(ids), stride=len(ids))
    assert r.scored == len(ids) - 1 and r.files[0].windows == 1
    assert math.isclose(r.nll, nll, rel_tol=1e-9)


@pytest.mark.parametrize("context, stride", [(64, 32), (24, 24), (24, 5)])
def test_engine_agrees_with_torch_reference(tiny_model, text_file, context, stride):
    results = {
        backend: perplexity(
            make_scorer(tiny_model, backend, threads=2), [text_file], context, stride, 4
        )
        for backend in ("engine", "torch")
    }
    assert results["engine"].scored == results["torch"].scored > 100
    assert relative_difference(results["engine"].ppl, results["torch"].ppl) < 1e-3


def test_shipped_model_engine_agrees_with_torch(shipped_model, text_file):
    """The issue's acceptance check: engine and reference agree to 1e-3 relative."""
    text = text_file.read_text() * 3
    path = text_file.parent / "long.txt"
    path.write_text(text, encoding="utf-8")
    engine = perplexity(make_scorer(shipped_model, "engine"), [path], context=128, stride=64)
    torch = perplexity(make_scorer(shipped_model, "torch"), [path], context=128, stride=64)
    assert engine.scored == torch.scored > 300
    assert relative_difference(engine.ppl, torch.ppl) < 1e-3
    assert engine.ppl < 400  # a trained model: a random one scores about its vocabulary (4096)


def test_cli_eval_ppl_json(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", str(tiny_model), str(text_file), "--context", "32"]
    assert main([*argv, "--backend", "both", "--json", "--quiet", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["engine"]["stride"] == 16 and printed["relative_difference"] < 1e-3
    assert main([*argv, "--quiet"]) == 0
    assert "ppl" in capsys.readouterr().out
    assert main([*argv, "--context", "1000", "--quiet"]) == 1  # beyond the model's context


NO_TORCH = r"""
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")

sys.meta_path.insert(0, BlockTorch())
from bitnet158.cli import main
assert main(["eval", "ppl", sys.argv[1], sys.argv[2], "--context", "32", "--quiet"]) == 0
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
"""


def test_engine_perplexity_imports_no_torch(tiny_model, text_file):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tiny_model), str(text_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
