"""Run a command and take its whole process tree down with it, however the process that started it ends.

``mdbench reproduce`` runs each papermill process under :func:`guard`. The guard is a child subreaper (Linux), so the
Jupyter kernel, which jupyter_client starts in a session of its own, stays its descendant even if papermill dies
first. When the guard is told to stop (SIGTERM, SIGINT, SIGHUP) or sees that its owner is gone (also after
``kill -9``: it polls its parent pid, which ``PR_SET_PDEATHSIG`` would not do reliably for a threaded owner), it kills
all its descendants and exits. psutil finds the descendants; nothing in the standard library walks a process tree.

This module imports nothing heavy: the guard must be up in a fraction of a second.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.1  # how often the guard looks at its owner and command (and so how fast it reacts)
GRACE_S = 2.0  # SIGTERM, then SIGKILL for what is still alive after this long

_GUARD_MAIN = "import sys; from mdbench.process_guard import guard; sys.exit(guard(sys.argv[1:]))"


def guard_command(cmd: list[str]) -> list[str]:
    """``cmd`` run under :func:`guard`, tied to this process."""
    return [sys.executable, "-c", _GUARD_MAIN, str(os.getpid()), *cmd]


def _become_subreaper() -> None:
    """Have orphaned descendants (the kernel, if papermill dies first) reparented to us rather than to init."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap() -> None:
    """Collect the exit status of every child that has ended (a subreaper inherits zombies)."""
    while hasattr(os, "WNOHANG"):  # Windows has no zombies to collect
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_descendants(pid: int | None = None, grace_s: float = GRACE_S) -> None:
    """SIGTERM every descendant of ``pid`` (this process by default), SIGKILL what is left after ``grace_s``, and
    repeat until none is left (or a stuck one outlasts another few seconds), reaping those that are our children."""
    import psutil

    deadline, give_up = time.monotonic() + grace_s, time.monotonic() + grace_s + 5
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while time.monotonic() < give_up:
        if pid is None:
            _reap()
        alive = []
        try:
            descendants = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in descendants:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    proc.send_signal(signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL)
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            break
        time.sleep(POLL_S / 2)
    if pid is None:
        _reap()


def guard(argv: list[str]) -> int:
    """The guard process: run ``argv[1:]`` and take its whole process tree down with it.

    ``argv[0]`` is the pid of the mdbench process that started the guard. When that process is gone (even killed by
    ``kill -9``), or the guard gets SIGTERM, SIGINT or SIGHUP, every descendant is killed. Returns the command's exit
    status, or 128 + the signal number when it was stopped.
    """
    owner, cmd = int(argv[0]), argv[1:]
    stop: list[int] = []
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, _frame: stop.append(signum))
    _become_subreaper()
    returncode = None
    try:
        if not stop and os.getppid() == owner:  # the owner may have died before the handlers were in place
            child = subprocess.Popen(cmd)
            while returncode is None and not stop and os.getppid() == owner:
                time.sleep(POLL_S)
                returncode = child.poll()
    finally:
        kill_descendants()  # also what papermill left behind when it ended by itself
    return returncode if returncode is not None else 128 + (stop[0] if stop else signal.SIGTERM)
