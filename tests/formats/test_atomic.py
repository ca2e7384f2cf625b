"""formats/atomic.py: temporary siblings, the removal of killed writers' leftovers, and the
replacement of a file or a directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from bitnet158.formats import atomic


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_siblings_have_ordinary_permissions(tmp_path):
    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"")  # what open() gives under this umask
    os.mkdir(tmp_path / "ordinary-dir")
    f = atomic.temporary_sibling(tmp_path / "out.gguf")
    d = atomic.temporary_sibling(tmp_path / "out-hf", directory=True)
    assert stat.S_IMODE(f.stat().st_mode) == stat.S_IMODE(ordinary.stat().st_mode)
    assert stat.S_IMODE(d.stat().st_mode) == stat.S_IMODE(
        (tmp_path / "ordinary-dir").stat().st_mode
    )
    assert f.name.startswith(f"out.gguf.{os.getpid()}-") and f.name.endswith(".tmp")
    assert d.is_dir() and d.name.startswith(f"out-hf.{os.getpid()}-")


def test_only_leftovers_of_ended_writers_of_that_destination_are_removed(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    dst = tmp_path / "model.safetensors"
    left_file = tmp_path / f"model.safetensors.{gone}-abc123_x.tmp"
    left_dir = tmp_path / f"model.safetensors.{gone}-zz9.tmp"
    keep = [
        tmp_path / f"model.safetensors.{alive}-abc.tmp",  # a writer that still runs
        tmp_path / f"other.safetensors.{gone}-abc.tmp",  # another destination
        tmp_path / "model.safetensors.notes.tmp",  # not a name we make
        tmp_path / f"model.safetensors.{gone}-abc.tmp.bak",
        tmp_path / "model.safetensors",
    ]
    left_file.write_bytes(b"torn")
    left_dir.mkdir()
    (left_dir / "model.safetensors").write_bytes(b"torn")
    for p in keep:
        p.write_bytes(b"keep")
    assert sorted(atomic.remove_leftovers(dst)) == sorted([left_file, left_dir])
    assert sorted(tmp_path.iterdir()) == sorted(keep)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_replace_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dst = tmp_path / "out-hf"
    for content in (b"first", b"second"):
        tmp = atomic.temporary_sibling(dst, directory=True)
        (tmp / "model.safetensors").write_bytes(content)
        atomic.replace_directory(tmp, dst)
        assert (dst / "model.safetensors").read_bytes() == content
        assert [p.name for p in tmp_path.iterdir()] == ["out-hf"]


def test_replace_file(tmp_path):
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"old")
    tmp = atomic.temporary_sibling(dst)
    tmp.write_bytes(b"new")
    atomic.replace_file(tmp, dst)
    assert dst.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from-a").write_bytes(b"")
    assert atomic._exchange(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]
    assert list((tmp_path / "a").iterdir()) == []
