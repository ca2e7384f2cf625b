"""The training commands end to end: tokenize -> train (resume) -> export -> sft -> dpo,
quantize, each output checked where it must run (our engine, transformers)."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from train_fixtures import CORPUS, TOKENIZER_JSON, torchrun, torchrun_failure

import bitnet158
from bitnet158.cli import build_parser, main
from bitnet158.train.models import load_for_export

COMMANDS = ["tokenize", "train", "sft", "dpo", "quantize", "export"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: bitnet158 {command}" in capsys.readouterr().out


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "tokenizer.json").write_text(TOKENIZER_JSON)
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    (d / "more.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:8]) + "\n")
    convs = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "Paris."}]},
             {"prompt": "ROMEO:", "completion": "But, soft!"}]  # fmt: skip
    (d / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    prefs = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
             {"prompt": "ROMEO:", "chosen": "But, soft!", "rejected": "It is the east."}]  # fmt: skip
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(p) for p in prefs) + "\n")
    return d


TRAIN = ["--hidden", "32", "--layers", "1", "--heads", "2", "--steps", "6", "--batch-size", "2",
         "--seq-len", "16", "--checkpoint-every", "3", "--quiet", "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(workdir):
    """tokenize, then train with an export at the end (module-scoped: later tests reuse it)."""
    assert main(["tokenize", str(workdir / "corpus.txt"), str(workdir / "more.jsonl"),
                 "--tokenizer", str(workdir / "tokenizer.json"), "--out", str(workdir / "tok"),
                 "--quiet"]) == 0  # fmt: skip
    args = ["train", "--data", workdir / "tok", "--out", workdir / "run", "--val-tokens", "200",
            "--export", workdir / "model.safetensors", *TRAIN]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return workdir


def test_train_exports_a_file_the_engine_runs_with_the_trained_logits(trained):
    model, meta = load_for_export(trained / "run")
    assert meta["step"] == 6 and sorted(p.name for p in (trained / "run").glob("step-*")) == [
        "step-000003", "step-000006"]  # fmt: skip
    ids = [0, 20, 31, 45, 7, 99]
    engine = bitnet158.load(trained / "model.safetensors")
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(engine.logits(ids), want, rtol=1e-4, atol=1e-4)


def test_rerunning_train_resumes_and_export_reproduces_the_file(trained, capsys):
    args = ["train", "--data", trained / "tok", "--out", trained / "run", "--val-tokens", "200",
            *TRAIN]  # fmt: skip
    code, out, _ = run(capsys, *args)
    assert code == 0 and "resumed from" in out and json.loads(out[out.index("{") :])["steps"] == 6
    code, out, _ = run(capsys, "export", trained / "run", trained / "again.safetensors")
    assert code == 0
    a, b = (
        load_file(str(trained / "model.safetensors")),
        load_file(str(trained / "again.safetensors")),
    )
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_export_to_transformers_runs_in_transformers(trained, capsys):
    transformers = pytest.importorskip("transformers")
    code, _, err = run(capsys, "export", trained / "run", trained / "hf", "--hf")
    assert code == 0, err
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained / "hf").eval()
    model, _ = load_for_export(trained / "run")
    ids = torch.tensor([[0, 20, 31, 45, 7, 99]])
    # transformers unpacks BitNet weights in a torch.compile'd function: eager is the same
    # math without half a minute of compilation
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        torch.testing.assert_close(hf(ids).logits.float(), model(ids), rtol=1e-3, atol=1e-3)


def test_sft_then_dpo_from_the_exported_model(trained, capsys):
    d = trained
    common = ["--steps", "3", "--batch-size", "2", "--seq-len", "48", "--quiet", "--json"]
    code, out, err = run(capsys, "sft", "--model", d / "model.safetensors", "--data",
                         d / "chat.jsonl", "--out", d / "sft", "--export", d / "sft.safetensors",
                         *common)  # fmt: skip
    assert code == 0, err
    summary = json.loads(out[out.index("{") :])
    assert summary["steps"] == 3 and summary["data"].startswith("2 examples")
    code, out, err = run(capsys, "dpo", "--model", d / "sft", "--data", d / "prefs.jsonl",
                         "--out", d / "dpo", "--lr", "1e-3", "--export", d / "dpo.safetensors",
                         *common)  # fmt: skip
    assert code == 0, err
    assert json.loads(out[out.index("{") :])["data"].startswith("2 pairs")
    assert (
        bitnet158.load(d / "dpo.safetensors").generate("ROMEO:", max_new_tokens=4, seed=0)
        is not None
    )


def test_quantize_a_hugging_face_model_and_fine_tune_it(workdir, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, bos_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    src = workdir / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    (src / "tokenizer.json").write_text(TOKENIZER_JSON)
    code, out, err = run(capsys, "quantize", src, workdir / "llama-b158", "--data",
                         workdir / "corpus.txt", "--steps", "4", "--batch-size", "2",
                         "--seq-len", "16", "--lambda-warmup", "2", "--native",
                         workdir / "llama.safetensors", "--quiet", "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out[out.index("{") :])
    assert summary["converted_layers"] == 7
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "llama-b158").eval()
    ids = [0, 20, 31, 45]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = bitnet158.load(workdir / "llama.safetensors").logits(ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "train",
                "--data",
                "/no/such.txt",
                "--out",
                "{d}/x",
                "--tokenizer",
                "{d}/tokenizer.json",
            ],
            "no such file",
        ),
        (
            [
                "sft",
                "--model",
                "{d}/model.safetensors",
                "--data",
                "{d}/corpus.txt",
                "--out",
                "{d}/y",
            ],
            "corpus.txt:1: not valid JSON",
        ),
        (
            ["train", "--data", "{d}/tok", "--out", "{d}/run", "--hidden", "64", "--steps", "6"],
            "another model configuration",
        ),
        (["export", "{d}/nothing", "{d}/z.safetensors"], "neither a training checkpoint"),
    ],
)
def test_errors_are_one_line(trained, capsys, args, message):
    code, _, err = run(capsys, *[a.format(d=trained) for a in args])
    assert code == 1 and "Traceback" not in err
    assert err.startswith("bitnet158: error:") and message in err


def test_torchrun_two_processes_fsdp_train_and_export(trained, tmp_path):
    result = torchrun(["-m", "bitnet158.cli", "train", "--data", str(trained / "tok"),
                       "--out", str(tmp_path / "run"), "--strategy", "fsdp",
                       "--export", str(tmp_path / "m.safetensors"),
                       *[a for a in TRAIN if a != "--json"]])  # fmt: skip
    assert result.returncode == 0, torchrun_failure(result)
    assert result.stdout.count("steps: 6") == 1  # the summary comes from process 0 only
    model, _ = load_for_export(tmp_path / "run")
    ids = [0, 20, 31, 45]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(bitnet158.load(tmp_path / "m.safetensors").logits(ids), want,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
