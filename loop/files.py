"""Atomic writes: a temporary name in the same folder, then `os.replace`.

A file (or folder) that exists under its real name is whole: a crash leaves at
most a hidden `.NAME.tmp-PID` behind, never a half-written file that looks done.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import psutil

from server.tempfiles import TEMP_PATTERN, temp_name


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    injected_fault(path)
    tmp = temp_name(path)
    try:
        tmp.write_bytes(data)
    except OSError:
        tmp.unlink(missing_ok=True)  # a disk that filled up mid-write leaves no temp file either
        raise
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(out: Path):
    """Yield a fresh temporary folder; on success it replaces `out` whole."""
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def sweep_stale_temps(root: Path) -> list[Path]:
    """Remove the temp files and folders of processes that died mid-write (a crash, SIGKILL)."""
    removed = []
    for p in root.rglob(".*"):
        m = TEMP_PATTERN.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or psutil.pid_exists(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# --- disk problems ---------------------------------------------------------------

_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder"}


def disk_problem(e: BaseException, resume: str | None = None) -> str | None:
    """One line for a write that failed because of the disk (not the program), else None.
    `resume`: the command that picks the work up again, when there is one."""
    if not isinstance(e, OSError) or e.errno not in _DISK_ERRNOS:
        return None
    where = f" writing {e.filename}" if e.filename else ""
    fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make the folder writable"
    then = f"; resume with: {resume}" if resume else ", then run the same command again (nothing kept is lost)"
    return f"{_DISK_ERRNOS[e.errno]}{where}: {fix}{then}"


_WRITES: dict[str, int] = {}


def injected_fault(path: Path) -> None:
    """Fault injection for the reliability tests: ISARA_FAULT_ENOSPC=NAME:N makes every write to a
    file named NAME after its first N fail with ENOSPC, as a full disk would. Unset: nothing."""
    spec = os.environ.get("ISARA_FAULT_ENOSPC")
    if not spec:
        return
    name, _, after = spec.rpartition(":")
    if Path(path).name != name:
        return
    _WRITES[name] = _WRITES.get(name, 0) + 1
    if _WRITES[name] > int(after):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
