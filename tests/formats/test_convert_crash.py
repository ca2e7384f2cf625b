"""`bitnet158 convert` killed with SIGKILL at random moments, over an existing destination.

After every kill the destination must be byte for byte the old complete output or the new
complete one (the new one made by an uninterrupted run of the same command), never a mix or a
truncation; anything else the kill left must be a temporary sibling named as such
(`<destination>.<pid>-<random>.tmp`), and the next run must remove it.

Each target is killed KILLS times: at random moments drawn over the whole measured duration of
the command (start-up included), and once its temporary output exists: at once (mid-write),
then at random moments until the measured end.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitnet158.formats.convert import SHIPPED_PATH, convert, read_checkpoint
from bitnet158.formats.native import save_native

TARGETS = {"bitnet158": "model.safetensors", "gguf-tq2_0": "model.gguf", "hf": "model-hf"}
# Another complete output of the same kind, standing for the file a user already has.
OLD_KIND = {"bitnet158": "bitnet158", "gguf-tq2_0": "gguf-tq1_0", "hf": "hf-bf16"}
KILLS = 6

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def snapshot(path: Path) -> dict[str, bytes]:
    """The bytes of a file, or of every file of a directory by relative path."""
    if path.is_dir():
        return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))}
    return {"": path.read_bytes()}


def restore(snap: dict[str, bytes], path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if "" in snap:
        path.write_bytes(snap[""])
        return
    for name, data in snap.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)


def command(dst: Path, to: str) -> list[str]:
    return [sys.executable, "-m", "bitnet158.cli", "convert", "shakespeare-b158", str(dst),
            "--to", to, "--force", "--quiet"]  # fmt: skip


def leftovers(dst: Path) -> list[Path]:
    return [p for p in dst.parent.iterdir() if p.name != dst.name]


def wait_for_temporary(proc: subprocess.Popen, dst: Path) -> bool:
    """Poll until the process has created its temporary output (False: it ended first)."""
    pattern = re.compile(re.escape(dst.name) + rf"\.{proc.pid}-\w+\.tmp")
    while proc.poll() is None:
        if any(pattern.fullmatch(p.name) for p in dst.parent.iterdir()):
            return True
        time.sleep(0.0005)
    return False


@pytest.mark.parametrize("to", list(TARGETS))
def test_sigkill_leaves_the_old_or_the_new_output(tmp_path, to):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The new complete output, by an uninterrupted run of the same command; its duration.
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    start = time.perf_counter()
    proc = subprocess.Popen(command(ref_dir / TARGETS[to], to), env=env)
    assert wait_for_temporary(proc, ref_dir / TARGETS[to])
    writing_from = time.perf_counter() - start
    assert proc.wait(120) == 0
    duration = time.perf_counter() - start
    new = snapshot(ref_dir / TARGETS[to])
    # The old complete output: another model file of the same kind.
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    if to == "bitnet158":  # the same model, written by an older conversion
        ckpt = read_checkpoint(SHIPPED_PATH)
        save_native(old_dir / TARGETS[to], ckpt.config, ckpt.tensors, ckpt.tokenizer_json,
                    ckpt.chat_template, source="an older conversion")  # fmt: skip
    else:
        convert(SHIPPED_PATH, old_dir / TARGETS[to], to=OLD_KIND[to])
    old = snapshot(old_dir / TARGETS[to])
    assert old != new

    work = tmp_path / "work"
    work.mkdir()
    dst = work / TARGETS[to]
    rng = random.Random(f"{to}-kills")
    outcomes, killed = [], set()
    for i in range(KILLS):
        restore(old, dst)
        proc = subprocess.Popen(command(dst, to), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        if i % 2 == 0:  # anywhere from start-up to the end
            phase = "any"
            time.sleep(rng.uniform(0, duration))
        else:  # as soon as the output is being written, then anywhere until the end
            phase = "writing" if wait_for_temporary(proc, dst) else "ended"
            time.sleep(0 if i == 1 else rng.uniform(0, duration - writing_from))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed.add(proc.pid)
        got = snapshot(dst)
        assert got in (old, new), f"kill {i} ({phase}): the destination is torn"
        outcomes.append((phase, proc.returncode, "new" if got == new else "old"))
        for p in leftovers(dst):  # only temporary outputs of killed runs may remain
            m = re.fullmatch(re.escape(dst.name) + r"\.(\d+)-\w+\.tmp", p.name)
            assert m and int(m.group(1)) in killed, p
    # A run to the end replaces the old output and removes what the killed runs left.
    restore(old, dst)
    subprocess.run(command(dst, to), env=env, check=True, timeout=120)
    assert snapshot(dst) == new
    assert leftovers(dst) == []
    # at least one kill hit a run that had begun writing and had not ended
    print(f"{to}: (phase, exit status, destination) after each kill: {outcomes}")  # pytest -s
    # some kill hit a run that had begun writing its output and had not ended
    assert ("writing", -signal.SIGKILL) in [o[:2] for o in outcomes], outcomes
