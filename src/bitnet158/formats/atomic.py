"""Writing an output file or directory so that a kill at any moment never leaves it torn.

The output is written to a temporary sibling and renamed into place: the destination is always
either what it was or the new complete output. A writer killed mid-way (SIGKILL, Ctrl-C during
a flush) leaves its temporary sibling behind, named `<destination>.<pid>-<random>.tmp` so that
it cannot be mistaken for output; the next write to the same destination removes it once the
process that made it is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from .pages import drop_cached


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_leftovers(dst: Path) -> list[Path]:
    """Delete the temporary siblings of `dst` left by writers that were killed; returns them.

    Siblings of a process that still runs (another writer of the same destination) are kept.
    """
    removed = []
    leftover = re.compile(re.escape(dst.name) + r"\.(\d+)-\w+\.tmp")  # see temporary_sibling
    for p in dst.parent.iterdir() if dst.parent.is_dir() else ():
        m = leftover.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and _process_is_gone(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def temporary_sibling(dst: Path, directory: bool = False) -> Path:
    """A new empty file (or directory) beside `dst` to write the output into, with the
    permissions an ordinary new file gets (mkstemp's are owner-only); leftovers of killed
    writers of `dst` are removed first."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst)
    prefix, where = f"{dst.name}.{os.getpid()}-", dst.parent
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=where))
        tmp.chmod(0o777 & ~_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=where)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o666 & ~_umask())
    return tmp


def fsync_path(path: Path) -> None:
    """Flush a written file (or a directory's entries) to disk; best effort for directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def replace_file(tmp: Path, dst: Path) -> None:
    """Move the finished temporary file onto `dst` in one atomic rename, durably; its cached
    pages are dropped (pages.drop_cached: the next load maps it in 2 MB pages)."""
    fsync_path(tmp)
    drop_cached(tmp)
    os.replace(tmp, dst)
    fsync_path(dst.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_directory(tmp: Path, dst: Path) -> None:
    """Move the finished temporary directory onto `dst`, replacing what is there.

    An existing `dst` is swapped with `tmp` in one atomic step where the system can (Linux),
    then the old one, now under the temporary name, is deleted. Elsewhere the old directory is
    renamed aside first, which leaves a moment without `dst`.
    """
    for f in tmp.iterdir():
        fsync_path(f)
    if not dst.exists():
        os.replace(tmp, dst)
    elif _exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        aside = temporary_sibling(dst, directory=True)
        os.replace(dst, aside / "previous")
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(aside / "previous", dst)
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    fsync_path(dst.parent)
