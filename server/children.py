"""Child processes that never outlive isara.

Every tool isara starts (llama-server, the converter, the quantizer) gets a
parent-death signal: if isara dies, even by SIGKILL, the kernel kills the
child too, so a crash never leaves an orphan converting or serving. (Linux
sends it when the *thread* that started the child ends: start children from
the main thread or a thread that lives as long as they should.)
"""

from __future__ import annotations

import ctypes
import signal
import subprocess

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal() -> None:
    """Runs in the child between fork and exec. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def run_tied(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """`subprocess.run` whose child dies with isara."""
    return subprocess.run(cmd, preexec_fn=set_parent_death_signal, **kw)
