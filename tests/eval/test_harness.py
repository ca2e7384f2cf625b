"""The lm-eval adapter, run by lm-eval's own evaluator on small local tasks (YAML + JSON)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from bitnet158.eval.harness import BitNet158LM  # noqa: E402
from bitnet158.eval.scoring import make_scorer  # noqa: E402

DOCS = [
    {"question": "ROMEO: But, soft! what light through yonder", "choices": ["window breaks?", "Juliet sun east", "naïve café"], "answer": 0},
    {"question": "JULIET: O Romeo, Romeo! wherefore art", "choices": ["thou Romeo?", "window", "the east, and"], "answer": 0},
    {"question": "It is the east, and Juliet is", "choices": ["the sun.", "Romeo!", "soft"], "answer": 1},
    {"question": "", "choices": ["ROMEO:", "JULIET:"], "answer": 0},
]  # fmt: skip
TEXTS = [{"text": "It is the east, and Juliet is the sun. " * n} for n in (1, 3, 9)]

TASKS = {
    "tiny_mc": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "tiny_gen": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["\\n", "?"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three lm-eval tasks defined in YAML over local JSON files (no dataset hub)."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "mc.json").write_text(json.dumps(DOCS), encoding="utf-8")
    (root / "texts.json").write_text(json.dumps(TEXTS), encoding="utf-8")
    for name, body in TASKS.items():
        data = root / ("texts.json" if name == "tiny_rolling" else "mc.json")
        head = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n"
        )
        (root / f"{name}.yaml").write_text(head + body, encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def evaluate(task_dir, model_args, tasks, batch_size=1):
    return lm_eval.simple_evaluate(
        model="bitnet158",
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=batch_size,
        log_samples=True,
        verbosity="ERROR",
    )


def reference_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from the torch reference model, tokenized as lm-eval does."""
    tok = model.tokenizer
    if context:
        whole = tok.encode(context + continuation, add_bos=True)
        ctx = tok.encode(context, add_bos=True)
        cont = whole[len(ctx) :]
    else:
        ctx, cont = [tok.bos_token_id], tok.encode(continuation, add_bos=False)
    s = model.score([ctx + cont])[0]
    return float(s.logprobs[-len(cont) :].sum()), bool(s.greedy[-len(cont) :].all())


def test_registered_in_lm_eval():
    assert get_model("bitnet158") is BitNet158LM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models stay available


def test_multiple_choice_loglikelihoods_match_the_torch_reference(task_dir, tiny_model):
    out = evaluate(task_dir, f"path={tiny_model}", ["tiny_mc"], batch_size=3)
    reference = make_scorer(tiny_model, "torch")
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        for (context, continuation), (logprob, greedy) in zip(
            sample["arguments"], sample["filtered_resps"], strict=True
        ):
            want, want_greedy = reference_loglikelihood(reference, context, continuation)
            assert logprob == pytest.approx(want, rel=1e-3, abs=1e-3)
            assert greedy == want_greedy
    predicted = [int(np.argmax([r[0] for r in s["filtered_resps"]])) for s in samples]
    acc = np.mean([p == d["answer"] for p, d in zip(predicted, DOCS, strict=True)])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)


@pytest.mark.parametrize("backend", ["engine", "torch"])
def test_batching_does_not_change_the_answers(tiny_model, backend):
    model = BitNet158LM(path=str(tiny_model), backend=backend, batch_size=1)
    requests = [
        Instance("loglikelihood", {}, (d["question"], " " + c), i)
        for i, d in enumerate(DOCS)
        for c in d["choices"]
    ]
    one = model.loglikelihood(requests, disable_tqdm=True)
    model.batch_size = 4
    four = model.loglikelihood(requests, disable_tqdm=True)
    assert [g for _, g in one] == [g for _, g in four]
    np.testing.assert_allclose([v for v, _ in one], [v for v, _ in four], rtol=1e-5)


def test_rolling_loglikelihood_spans_windows(task_dir, tiny_model):
    """Texts longer than max_length are scored in disjoint windows; the sum matches the
    reference scoring each window itself."""
    max_length = 16
    out = evaluate(task_dir, f"path={tiny_model},max_length={max_length}", ["tiny_rolling"], 2)
    reference = make_scorer(tiny_model, "torch")
    tok = reference.tokenizer
    for sample in out["samples"]["tiny_rolling"]:
        text = sample["arguments"][0][0]
        ids = [tok.bos_token_id, *tok.encode(text, add_bos=False)]
        want = 0.0
        for start in range(1, len(ids), max_length):  # targets ids[start:end], 16 at a time
            end = min(start + max_length, len(ids))
            window = ids[max(0, end - max_length - 1) : end]  # with the most history that fits
            want += float(reference.score([window])[0].logprobs[start - end :].sum())
        assert sample["filtered_resps"][0] == pytest.approx(want, rel=1e-3)
    assert len(tok.encode(TEXTS[-1]["text"], add_bos=False)) > 3 * max_length
    assert out["results"]["tiny_rolling"]["word_perplexity,none"] > 1


def test_generate_until_is_greedy_and_stops(task_dir, tiny_model):
    out = evaluate(task_dir, f"path={tiny_model}", ["tiny_gen"])
    engine = make_scorer(tiny_model, "engine")
    for sample in out["samples"]["tiny_gen"]:
        context = sample["arguments"][0][0]
        text = sample["filtered_resps"][0]
        assert "\n" not in text and "?" not in text
        ids = engine.tokenizer.encode(context, add_bos=True)
        full = engine.model.generate(ids, max_new_tokens=6, temperature=0.0)
        assert full.startswith(text)
    torch_model = BitNet158LM(path=str(tiny_model), backend="torch")
    engine_model = BitNet158LM(path=str(tiny_model), backend="engine")
    req = [Instance("generate_until", {}, ("ROMEO: But", {"until": ["\n"], "max_gen_toks": 5}), 0)]
    assert torch_model.generate_until(req, True) == engine_model.generate_until(req, True)


NO_TORCH = r"""
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")

sys.meta_path.insert(0, BlockTorch())
from lm_eval.api.instance import Instance
from bitnet158.eval.harness import BitNet158LM
lm = BitNet158LM(path=sys.argv[1], batch_size=2)
req = [Instance("loglikelihood", {}, ("ROMEO: But", " soft"), 0)]
(value, greedy), = lm.loglikelihood(req, disable_tqdm=True)
assert value < 0
req = [Instance("loglikelihood_rolling", {}, ("It is the east",), 0)]
assert lm.loglikelihood_rolling(req, disable_tqdm=True)[0] < 0
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
"""


def test_engine_adapter_imports_no_torch(tiny_model):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
