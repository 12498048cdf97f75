"""One writer per run directory.

``tskd train`` (and so the Slicer module's Train and Resume, which run it) holds
``RUN_DIR/.tskd.lock`` for the whole run: an OS file lock (:class:`filelock.FileLock`, ``flock`` on
POSIX, ``msvcrt.locking`` on Windows) taken without waiting. Beside it, ``RUN_DIR/.tskd.lock.json``
names the holder (pid, host, command, start time) so that a second process refuses at once with
:class:`~TSKDLib.errors.RunLockedError` naming it.

Stale locks: the OS releases a file lock when its process ends, even on SIGKILL or a crash, so a
run whose process is gone is simply taken over (the leftover ``.tskd.lock.json`` is replaced and
the takeover is reported). Where the file system has no OS locks, filelock falls back to a lock
file whose existence is the lock; such a file left by a process that no longer runs on this host
is removed and the lock taken.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from TSKDLib.errors import RunLockedError

log = logging.getLogger(__name__)

LOCK_NAME = ".tskd.lock"
LOCK_INFO_NAME = ".tskd.lock.json"
LOCK_ITEMS = (LOCK_NAME, LOCK_INFO_NAME)
#: How long to wait for the children of a dead holder (which inherited its lock) to exit.
STALE_WAIT_S = 10.0


def _pid_running(pid: int) -> bool:
    try:
        import psutil
        return psutil.pid_exists(pid)
    except ImportError:  # pragma: no cover
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class RunLock:
    """The lock of one run directory; a context manager.

    ``acquire()`` raises :class:`RunLockedError` at once when another process holds it;
    :attr:`took_over` is the holder record of a stale lock that was taken over (else None)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.lock_path = self.run_dir / LOCK_NAME
        self.info_path = self.run_dir / LOCK_INFO_NAME
        self._lock = None
        self.took_over: dict | None = None

    # -- holder record ------------------------------------------------------------------------
    def holder(self) -> dict | None:
        """The holder record written by the process that took the lock (None if absent/unreadable)."""
        try:
            info = json.loads(self.info_path.read_text())
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def describe(info: dict | None) -> str:
        if not info:
            return "another process (it has not recorded its pid yet)"
        pid, host = info.get("pid"), info.get("host")
        alive = "" if host != socket.gethostname() or not isinstance(pid, int) else (
            "" if _pid_running(pid) else ", no longer running")
        cmd = f", `{info['command']}`" if info.get("command") else ""
        return f"process {pid} on {host}{cmd}, started {info.get('started', '?')}{alive}"

    def _is_stale(self, info: dict | None) -> bool:
        return bool(info) and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
            and info["pid"] != os.getpid() and not _pid_running(info["pid"])

    # -- locking ------------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        from filelock import FileLock, Timeout

        from TSKDLib.data.io import guard_write

        with guard_write(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self.holder()
        lock = FileLock(str(self.lock_path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            info = self.holder()
            if self._is_stale(info):  # the recorded holder no longer runs on this host
                soft = type(lock).__name__ == "SoftFileLock"
                if soft:  # a lock file whose existence is the lock, left behind: remove it
                    self.lock_path.unlink(missing_ok=True)
                # An OS lock still held after its holder died belongs to a child it forked (a data
                # loader worker inherits it), which exits within seconds of its parent: wait a bit.
                try:
                    lock.acquire(timeout=0 if soft else STALE_WAIT_S)
                except Timeout:
                    pass
            if not lock.is_locked:
                raise RunLockedError(f"run directory is in use by {self.describe(info)}.", self.run_dir,
                                     "Wait for that run to finish, or stop it (the run stays resumable) and "
                                     "run the same command again; or choose another --out folder.") from None
        self._lock = lock
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous  # the OS lock was free: its holder ended without cleaning up
            log.warning("took over the stale lock of %s in %s", self.describe(previous), self.run_dir)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(["tskd", *sys.argv[1:]])[:300] if sys.argv else None}
        try:
            from TSKDLib.data.io import atomic_write
            text = json.dumps(record, indent=1)
            atomic_write(self.info_path, lambda tmp: tmp.write_text(text), overwrite=True)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            info = self.holder()
            if info and info.get("pid") == os.getpid():
                self.info_path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
