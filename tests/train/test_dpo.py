"""DPO: the loss against the formula computed independently, and against TRL's DPOTrainer."""

import copy
import math

import numpy as np
import pytest
import torch
from train_fixtures import TOKENIZER_JSON, tiny_config

from bitnet158.errors import FormatError
from bitnet158.nn.model import Transformer
from bitnet158.train.dpo import (
    DPOTask,
    build_preference_dataset,
    dpo,
    dpo_loss,
    read_preferences,
    sequence_logps,
)
from bitnet158.train.loop import TrainConfig
from bitnet158.train.sft import IGNORE

PAIRS = [
    ([{"role": "user", "content": "What is the capital of France?"}],
     [{"role": "assistant", "content": "Paris is the capital of France."}],
     [{"role": "assistant", "content": "Romeo is the capital."}]),
    ([{"role": "user", "content": "ROMEO:"}],
     [{"role": "assistant", "content": "But, soft! what light"}],
     [{"role": "assistant", "content": "It is the east"}]),
]  # fmt: skip


def reference_loss(logits_pol, logits_ref, targets, beta) -> float:
    """−log σ(β((π_w − ref_w) − (π_l − ref_l))), mean over pairs, in float64 numpy loops."""

    def logp(logits, y):
        total = 0.0
        for t, target in enumerate(y):
            if target == IGNORE:
                continue
            row = logits[t].astype(np.float64)
            total += row[target] - (row.max() + math.log(np.exp(row - row.max()).sum()))
        return total

    n = len(targets) // 2
    losses = []
    for i in range(n):
        pw, pl = logp(logits_pol[i], targets[i]), logp(logits_pol[n + i], targets[n + i])
        rw, rl = logp(logits_ref[i], targets[i]), logp(logits_ref[n + i], targets[n + i])
        z = beta * ((pw - rw) - (pl - rl))
        losses.append(math.log1p(math.exp(-z)))  # −log σ(z)
    return sum(losses) / n


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_equals_the_formula_computed_independently(tokenizer, beta):
    torch.manual_seed(0)
    policy = Transformer(tiny_config())
    torch.manual_seed(1)
    ref = Transformer(tiny_config())  # another model, so that the log-ratios are not zero
    data, stats = build_preference_dataset(tokenizer, PAIRS, seq_len=64)
    assert stats.pairs == 2
    cfg = TrainConfig(batch_size=2, seq_len=64)
    task = DPOTask(data, cfg, ref, beta)
    batch = task.batch(0)
    with torch.no_grad():
        ours = (task.loss_sum(policy, batch) / task.normalizer(batch)).item()
        x = torch.cat([batch["chosen_input"], batch["rejected_input"]])
        y = torch.cat([batch["chosen_target"], batch["rejected_target"]])
        expected = reference_loss(policy(x).numpy(), ref(x).numpy(), y.numpy(), beta)
    assert ours == pytest.approx(expected, rel=1e-5)
    assert task.normalizer(batch) == 2  # averaged over pairs


def test_identical_policy_and_reference_give_log_2():
    lp = torch.tensor([-3.0, -7.5])
    assert torch.allclose(dpo_loss(lp, lp - 1, lp, lp - 1), torch.full((2,), math.log(2)))
    logits = torch.randn(1, 4, 10)
    targets = torch.tensor([[IGNORE, 3, IGNORE, 7]])
    want = logits.log_softmax(-1)[0, 1, 3] + logits.log_softmax(-1)[0, 3, 7]
    torch.testing.assert_close(sequence_logps(logits, targets), want.reshape(1))


def test_dpo_raises_the_margin_of_the_chosen_answers(tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    initial = copy.deepcopy(model)
    cfg = TrainConfig(steps=15, batch_size=2, seq_len=64, warmup_steps=1, lr_peak=3e-3,
                      drop_at=1.0, wd_peak=0.0, log_every=100)  # fmt: skip
    result, _ = dpo(model, tokenizer, PAIRS, cfg, beta=0.1, log=lambda s: None)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert result.losses[-1] < 0.5
    data, _ = build_preference_dataset(tokenizer, PAIRS, 64)
    task = DPOTask(data, cfg, initial)
    with torch.no_grad():
        c, r = task.logps(model, task.batch(0))
        c0, r0 = task.logps(initial, task.batch(0))
    assert ((c - c0) - (r - r0) > 0).all()


def test_bad_preference_data(tmp_path, tokenizer):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(FormatError, match="p.jsonl:1: missing field"):
        read_preferences([f])
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": ""}\n'
                 '{"prompt": "ROMEO ROMEO ROMEO ROMEO", "chosen": "b", "rejected": "c"}\n')  # fmt: skip
    with pytest.raises(FormatError, match="1 with an empty response, 1 longer"):
        build_preference_dataset(tokenizer, read_preferences([f]), seq_len=12)


def test_loss_equals_trls_on_the_same_batch(tmp_path):
    """TRL's DPOTrainer computes its loss on a batch it tokenized; ours on the same tensors."""
    pytest.importorskip("trl")
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(TOKENIZER_JSON), bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")  # fmt: skip
    config = transformers.LlamaConfig(vocab_size=hf_tok.vocab_size, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(config)
    ref = transformers.LlamaForCausalLM(config)
    data = Dataset.from_list([
        {"prompt": "What is the capital of France?", "chosen": " Paris is the capital.",
         "rejected": " Rome, I think."},
        {"prompt": "ROMEO:", "chosen": " But, soft! what light", "rejected": " It is the east"},
    ])  # fmt: skip
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=2,
                     report_to=[], use_cpu=True, max_length=64, disable_tqdm=True)  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data,
                         processing_class=hf_tok)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
    # The same rows in our layout: input i predicts token i + 1, a target where it is completion.
    ids, mask = batch["input_ids"], batch["completion_mask"]
    y = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    n = len(ids) // 2  # TRL stacks [chosen..., rejected...]
    ours_batch = {"chosen_input": ids[:n, :-1], "chosen_target": y[:n],
                  "rejected_input": ids[n:, :-1], "rejected_target": y[n:]}  # fmt: skip
    task = DPOTask([None], TrainConfig(batch_size=n), ref, beta=0.1)
    with torch.no_grad():
        ours = (task.loss_sum(trainer.model, ours_batch) / n).item()
    assert trl_loss != pytest.approx(math.log(2), abs=1e-4)  # the two models differ
    assert ours == pytest.approx(trl_loss, rel=1e-5)
