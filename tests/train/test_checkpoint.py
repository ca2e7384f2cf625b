"""Checkpoints: atomic, bit-identical resume (also after SIGKILL), clear errors, NaN stops."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_config

from bitnet158.errors import FormatError
from bitnet158.nn.model import Transformer
from bitnet158.train.checkpoint import checkpoints, latest_checkpoint, load_checkpoint
from bitnet158.train.loop import TrainingError
from bitnet158.train.pretrain import TrainConfig, pretrain

HERE = Path(__file__).parent
TOKENS = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)


def config(out, **kw) -> TrainConfig:
    fields = dict(steps=8, batch_size=4, seq_len=16, warmup_steps=2, lr_peak=3e-3, out_dir=str(out),
                  checkpoint_every=2, log_every=100)  # fmt: skip
    return TrainConfig(**{**fields, **kw})


def fresh_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=64, **kw))


def quiet(_):
    pass


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_run_resumes_bit_identically(tmp_path):
    full = fresh_model()
    ref = pretrain(full, TOKENS, None, config(tmp_path / "a"), log=quiet)

    class Interrupt(Exception):
        pass

    def stop_at_5(step, loss):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(fresh_model(), TOKENS, None, config(tmp_path / "b"), log=quiet, on_step=stop_at_5)
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"
    resumed_model = fresh_model()
    resumed = pretrain(resumed_model, TOKENS, None, config(tmp_path / "b"), log=quiet)
    assert resumed.losses == ref.losses
    assert same_weights(resumed_model.state_dict(), full.state_dict())
    opt_a = load_file(str(ref.checkpoint / "optimizer.safetensors"))
    opt_b = load_file(str(resumed.checkpoint / "optimizer.safetensors"))
    assert same_weights(opt_a, opt_b)
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-000006", "step-000008"]  # keep=2


def start_worker(run: Path, delay: float, env: dict) -> subprocess.Popen:
    """kill_worker.py on `run`, returned once its imports are done and training begins."""
    proc = subprocess.Popen([sys.executable, str(HERE / "kill_worker.py"), str(run), str(delay)],
                            env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "training"
    return proc


def wait_for_checkpoint_write(proc: subprocess.Popen, run: Path) -> bool:
    """Poll until a checkpoint is being written (its temporary directory exists)."""
    while proc.poll() is None:
        if run.is_dir() and any(p.name.startswith(".tmp-step-") for p in run.iterdir()):
            return True
        time.sleep(0.0005)
    return False


def test_sigkill_at_random_points_then_resume_reaches_the_same_weights(tmp_path):
    """Killed again and again, at random moments and in the middle of checkpoint writes: every
    checkpoint left behind loads (optimizer state included), the last run resumes from the
    newest, and ends with the weights, optimizer state and losses of a run never interrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    # The uninterrupted run, here: kill_worker.py's model, data and settings, one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        pretrain(fresh_model(), TOKENS, None, config(tmp_path / "a", steps=12, checkpoint_every=1,
                                                     keep_checkpoints=3), log=quiet)  # fmt: skip
        duration = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    run, rng, kills = tmp_path / "b", np.random.default_rng(3), []
    for i in range(3):
        victim = start_worker(run, 0, env)
        if i == 1:  # while a checkpoint is being written
            where = "checkpoint write" if wait_for_checkpoint_write(victim, run) else "ended"
        else:
            where = "random"
            time.sleep(rng.uniform(0, duration))
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
        kills.append((where, victim.returncode))
        for ckpt in checkpoints(run):  # every checkpoint left behind is complete
            model = fresh_model()
            load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()))
    print(f"training kills (moment, exit status): {kills}")  # pytest -s
    assert ("checkpoint write", -signal.SIGKILL) in kills, kills
    last = latest_checkpoint(run)
    final = start_worker(run, 0, env)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0
    if last is not None:  # the last kill may have come after the end
        assert f"resumed from {last}" in out
    a, b = tmp_path / "a" / "step-000012", run / "step-000012"
    assert same_weights(
        load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    )
    assert same_weights(
        load_file(str(a / "optimizer.safetensors")), load_file(str(b / "optimizer.safetensors"))
    )
    assert json.loads((a / "state.json").read_text())["losses"] == json.loads(
        (b / "state.json").read_text())["losses"]  # fmt: skip
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = fresh_model()

    def poison(step, loss):
        if step == 4:  # after step 4's update: the weights of step 5 are NaN
            with torch.no_grad():
                model.layers[0].ffn_norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*step-000004"):
        pretrain(model, TOKENS, None, config(tmp_path / "run"), log=quiet, on_step=poison)
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-000002", "step-000004"]
    restored = fresh_model()
    load_checkpoint(tmp_path / "run" / "step-000004", restored)
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_leftover_temporary_directories_are_ignored_and_cleaned(tmp_path):
    run = tmp_path / "run"
    (run / ".tmp-step-000002-abc").mkdir(parents=True)
    (run / ".tmp-step-000002-abc" / "model.safetensors").write_bytes(b"torn")
    assert latest_checkpoint(run) is None
    pretrain(fresh_model(), TOKENS, None, config(run, steps=2), log=quiet)
    assert [
        p.name for p in run.iterdir() if p.name.startswith("step-") or p.name.startswith(".tmp")
    ] == ["step-000002"]


def test_corrupt_or_mismatched_checkpoints_are_clear_errors(tmp_path):
    result = pretrain(fresh_model(), TOKENS, None, config(tmp_path / "run", steps=2), log=quiet)
    ckpt = result.checkpoint
    with pytest.raises(
        FormatError,
        match=r"tensor embed.weight is torch.float32\[64, 32\], the model has torch.float32\[64, 64\]",
    ):
        load_checkpoint(ckpt, fresh_model(hidden_size=64, num_heads=2, num_kv_heads=2))
    with pytest.raises(FormatError, match="missing"):
        load_checkpoint(ckpt, fresh_model(num_layers=3))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(FormatError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(ckpt, fresh_model())
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(FormatError, match="state.json: corrupt"):
        load_checkpoint(ckpt, fresh_model())


def test_no_pickle_in_checkpoints(tmp_path):
    result = pretrain(fresh_model(), TOKENS, None, config(tmp_path / "run", steps=2), log=quiet)
    names = sorted(p.name for p in result.checkpoint.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "state.json"]
