"""Run the TSKD backend CLI and stop it if the process that started it (Slicer) goes away.

Usage: ``python -m TSKDSlicerLib.launcher --parent-pid PID -- train IMAGE ... --progress-json``

The backend runs in *this* process (``runpy`` of ``TSKDLib``, i.e. ``python -m TSKDLib ARGS``),
so stdout/stderr, the exit code and SIGTERM handling are exactly the backend's. A daemon thread
checks every two seconds that the parent is alive; when it is gone (Slicer closed or crashed) it
sends SIGTERM to this process, which the backend handles by checkpointing and exiting: the run
stays resumable and no job is orphaned. Nothing here imports Slicer or Qt.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import threading
import time


def _pid_alive_windows(pid: int) -> bool:  # pragma: no cover - Windows only
    """Windows without psutil: open the process and ask for its exit code (``os.kill(pid, 0)``
    would send CTRL_C_EVENT there instead of testing the process)."""
    import ctypes
    from ctypes import wintypes

    PROCESS_QUERY_LIMITED_INFORMATION, STILL_ACTIVE = 0x1000, 259
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    handle = kernel32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return False
        return code.value == STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _pid_alive_posix(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 tests for existence on POSIX only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def parent_alive(pid: int) -> bool:
    """True while process ``pid`` exists (psutil when available, else a platform check that
    never signals the process)."""
    try:
        import psutil
    except ImportError:
        return _pid_alive_windows(pid) if os.name == "nt" else _pid_alive_posix(pid)
    try:
        if not psutil.pid_exists(pid):
            return False
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - a vanished process raises various psutil errors
        return False


def watch_parent(pid: int, interval: float = 2.0) -> threading.Thread:
    """Start a daemon thread that SIGTERMs this process when ``pid`` disappears."""

    direct_child = os.name != "nt" and os.getppid() == pid

    def run():
        while True:
            time.sleep(interval)
            # Reparenting (POSIX) catches a dead parent even if its pid was reused.
            if not parent_alive(pid) or (direct_child and os.getppid() != pid):
                print(f"TSKD launcher: parent process {pid} is gone; stopping the job.", file=sys.stderr,
                      flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
                os._exit(143)

    thread = threading.Thread(target=run, name="tskd-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, backend = argv[:split], argv[split + 1:]
    else:
        own, backend = argv, []
    parser = argparse.ArgumentParser(prog="TSKDSlicerLib.launcher")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--module", default="TSKDLib", help="backend module run as __main__")
    opts = parser.parse_args(own)
    if opts.parent_pid:
        watch_parent(opts.parent_pid)
    sys.argv = [opts.module] + backend
    try:
        runpy.run_module(opts.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
