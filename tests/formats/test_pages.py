"""formats/pages.py: model files mapped with the huge-page advice, and written files leaving
the page cache, checked with the kernel's own accounting (smaps, mincore)."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from bitnet158.formats import atomic
from bitnet158.formats.pages import drop_cached, map_file

linux = pytest.mark.skipif(sys.platform != "linux", reason="smaps and mincore are Linux's")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError("no mapping holds the address")


def resident_pages(path: Path) -> int:
    """How many pages of the file are in the page cache (mincore over a fresh mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pages = -(-len(m) // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        address = np.frombuffer(m, dtype=np.uint8).ctypes.data
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(m)), vec) == 0
        return sum(v & 1 for v in vec)


def test_map_file_maps_the_bytes_read_only(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=3 << 20, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    buf = map_file(tmp_path / "f")
    assert np.array_equal(buf, data)
    with pytest.raises(ValueError):
        buf[0] = 1


@linux
@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="no huge pages here"
)
def test_map_file_advises_huge_pages(tmp_path):
    (tmp_path / "f").write_bytes(bytes(4 << 20))
    buf = map_file(tmp_path / "f")
    assert "hg" in vm_flags(buf.ctypes.data)  # VM_HUGEPAGE: madvise(MADV_HUGEPAGE) took
    plain = np.memmap(tmp_path / "f", dtype=np.uint8, mode="r")
    assert "hg" not in vm_flags(plain.ctypes.data)


@linux
def test_a_replaced_file_leaves_the_page_cache_intact(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, size=2 << 20, dtype=np.uint8).tobytes()
    dst = tmp_path / "model.bin"
    tmp = atomic.temporary_sibling(dst)
    tmp.write_bytes(data)
    assert resident_pages(tmp) > 0  # what a write leaves cached
    atomic.replace_file(tmp, dst)
    assert resident_pages(dst) == 0
    assert dst.read_bytes() == data  # dropped from the cache, not lost


@linux
def test_drop_cached_keeps_pages_a_process_maps(tmp_path):
    (tmp_path / "f").write_bytes(bytes(1 << 20))
    buf = map_file(tmp_path / "f")
    assert int(buf.sum()) == 0  # faulted in: mapped by this process
    drop_cached(tmp_path / "f")
    assert resident_pages(tmp_path / "f") == (1 << 20) // mmap.PAGESIZE
