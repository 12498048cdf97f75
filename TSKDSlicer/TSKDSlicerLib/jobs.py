"""Background ``tskd`` jobs: launch, read ``--progress-json`` lines, cancel the process tree, resume.

Plain Python (no Qt, no Slicer) so it is tested against the real backend in CI. In Slicer the
widget calls :meth:`BackendJob.poll` from a ``qt.QTimer`` on the main thread, which is the same
design as ``slicer.util.launchConsoleProcess(blocking=False)`` (a reader thread fills a queue, the
main thread drains it), but with stdout and stderr kept apart so JSON events and human logs
never interleave, and with a psutil tree-kill for Cancel.

Threading rule: reader threads only put raw lines on a queue. All parsing, state changes and
callbacks happen in :meth:`BackendJob.poll`, on the caller's thread (Slicer's main thread).

Resuming: the backend resumes a run when the same command is run again on the same run dir, so
:meth:`BackendJob.restart` starts the same argv again (without ``--overwrite``).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import backend_pythonpath  # noqa: F401 - part of this module's API

try:  # installed with the module's requirements (Slicer does not ship it); fallback without it
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

PRESETS = ("fast", "balanced", "quality")
DEVICES = ("auto", "cpu", "cuda")
STAGE_LABELS = {
    "prepare": "Preparing data",
    "teacher": "Fine-tuning the teacher (LoRA)",
    "synthesis": "Synthesising the transfer set",
    "distillation": "Distilling the student",
    "export": "Exporting the student",
    "segment": "Segmenting",
    "benchmark": "Benchmarking",
}
# Rough share of a training run's wall time per stage, for the overall progress bar.
STAGE_WEIGHTS = {"prepare": 0.03, "teacher": 0.32, "synthesis": 0.30, "distillation": 0.32,
                 "export": 0.03}

RUNNING, DONE, FAILED, CANCELLED, NOT_STARTED = "running", "done", "failed", "cancelled", "not started"


class JobCancelled(RuntimeError):
    """The user cancelled a job the caller was waiting for."""


def run_responsive(job: "BackendJob", pump=None, cancelled=None, interval: float = 0.02) -> str:
    """Start ``job`` and wait for it while keeping a GUI alive; returns the final status.

    ``pump()`` runs between polls (Slicer: ``slicer.app.processEvents``); each round does a
    non-blocking :meth:`BackendJob.poll`, so the GUI thread is never blocked for longer than one
    ``pump`` call. When ``cancelled()`` turns true the job is cancelled without blocking and
    :class:`JobCancelled` is raised once it has ended.
    """
    if job.process is None:
        job.start()
    asked = False
    while job.poll():
        if pump is not None:
            pump()
        if cancelled is not None and not asked and cancelled():
            asked = True
            job.cancel(timeout=10, block=False)
        time.sleep(interval)
    if asked or job.state.status == CANCELLED:
        raise JobCancelled("cancelled")
    return job.state.status


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------

#: Variables through which Slicer's launcher points Python at Slicer's own interpreter files. A
#: Python of another version or installation (a venv, conda) that inherits them loads Slicer's
#: standard library and fails to start, so they never reach an external Python.
SLICER_PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSTARTUP",
                           "PYTHONEXECUTABLE", "PYTHONPLATLIBDIR", "PYTHONSAFEPATH", "PYTHONUSERBASE",
                           "__PYVENV_LAUNCHER__", "VIRTUAL_ENV")


def backend_env(base: dict | None = None, module_dir: str | None = None, device: str | None = None,
                external_python: bool = False) -> dict:
    """Environment for a backend subprocess: unbuffered UTF-8 output, ``PYTHONPATH`` set.

    ``external_python``: the backend runs in the user's own Python (a venv/conda interpreter,
    possibly of another Python version): every variable of :data:`SLICER_PYTHON_VARIABLES` is
    dropped and ``PYTHONPATH`` holds only the folders of TSKDLib/TSKDSlicerLib. Otherwise (Slicer's
    PythonSlicer) an existing ``PYTHONPATH`` is kept after ours.
    ``device == "cpu"`` also hides GPUs (``CUDA_VISIBLE_DEVICES=-1``) so nothing touches them.
    """
    env = dict(os.environ if base is None else base)
    paths = backend_pythonpath(module_dir)
    if external_python:
        for name in SLICER_PYTHON_VARIABLES:
            env.pop(name, None)
    elif env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


PROBE_CODE = (
    "import json, sys\n"
    "out = {'python': list(sys.version_info[:3]), 'executable': sys.executable}\n"
    "try:\n"
    "    import importlib.metadata as m\n"
    "    out['torch'] = m.version('torch')\n"
    "except Exception:\n"
    "    out['torch'] = None\n"
    "try:\n"
    "    import TSKDLib\n"
    "    out['tskd'] = getattr(TSKDLib, '__version__', '?')\n"
    "except Exception as exc:\n"
    "    out['tskd'] = None\n"
    "    out['tskd_error'] = repr(exc)\n"
    "print(json.dumps(out))\n")


def probe_python(python: str, env: dict | None = None, timeout: float = 60.0) -> dict:
    """Start ``python`` with ``env`` and report ``{"python": [3, 12, 1], "torch": "2.5.1" | None,
    "tskd": version | None, "executable"}``. Raises ``RuntimeError`` with the interpreter's own
    error output when it does not start (the message the user sees)."""
    try:
        r = subprocess.run([python, "-c", PROBE_CODE], env=env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{python} could not be started: {exc}") from exc
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"{python} failed to start (exit code {r.returncode}):\n{tail}")
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{python} printed no answer: {r.stdout[-500:]}")


def launcher_prefix(python: str | None = None, watch_parent: bool = True) -> list[str]:
    """``[python, -m, TSKDSlicerLib.launcher, --parent-pid, PID, --]``: runs ``python -m TSKDLib``
    in a process that stops itself (SIGTERM, run stays resumable) if this process dies.

    With ``watch_parent=False``: ``[python, -m, TSKDLib]``.
    """
    python = python or sys.executable
    if not watch_parent:
        return [python, "-m", "TSKDLib"]
    return [python, "-m", "TSKDSlicerLib.launcher", "--parent-pid", str(os.getpid()), "--"]


def train_args(images: Sequence[str], labels: Sequence[str], out: str, preset: str = "fast",
               device: str = "auto", labelled_slices: Sequence[str] | str | None = None,
               config: str | None = None, overwrite: bool = False,
               class_map: str | None = None, axis: str | None = None) -> list[str]:
    """Arguments after ``tskd`` for ``tskd train`` (see docs/design.md); raises ``ValueError``.

    ``labelled_slices``: one spec per image (``"4,11-12,20"``, the file's own slice indices along
    the slice axis), passed as a repeated ``--labelled-slices`` option; None = the backend's
    default (slices holding any label). ``axis``: ``--axis`` (None: the backend's default,
    ``acquisition``).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, not {preset!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if not images or len(images) != len(labels):
        raise ValueError("give one labels file per image")
    args = ["train", *map(str, images), "--labels", *map(str, labels)]
    if class_map:
        args += ["--class-map", str(class_map)]
    if labelled_slices:
        specs = [labelled_slices] if isinstance(labelled_slices, str) else list(labelled_slices)
        if len(specs) != len(images):
            raise ValueError("give one labelled-slices spec per image")
        for spec in specs:  # the backend takes the option once per image, in image order
            args += ["--labelled-slices", spec]
    args += ["--out", str(out), "--preset", preset, "--device", device, "--progress-json"]
    if config:
        args += ["--config", str(config)]
    if overwrite:
        args.append("--overwrite")
    if axis:
        args += ["--axis", str(axis)]
    return args


def segment_args(model_dir: str, images: Sequence[str], out: str, device: str | None = None,
                 progress_json: bool = True) -> list[str]:
    """Arguments after ``tskd`` for ``tskd segment MODEL_DIR IMAGE... --out OUT``.

    One image: ``out`` is the labelmap file. Several: ``out`` is a folder and the labelmaps are
    written there as ``.nii.gz`` (``--format nii.gz``), one per image, named after it.
    """
    args = ["segment", str(model_dir), *map(str, images), "--out", str(out)]
    if len(images) > 1:
        args += ["--format", "nii.gz"]
    if device:
        args += ["--device", device]
    if progress_json:
        args.append("--progress-json")
    return args


# ---------------------------------------------------------------------------------------------
# Progress lines
# ---------------------------------------------------------------------------------------------

def parse_progress_line(line: str) -> dict | None:
    """The event dict of a ``--progress-json`` line, or None for anything else (a log line).

    Defensive: blank lines, non-JSON, JSON that is not an object or has no ``event`` -> None.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None
    return record


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``"1 h 02 min"``, ``95`` -> ``"1 min 35 s"``, None -> ``"?"``."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(float(seconds))))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


@dataclass
class JobState:
    """What the GUI shows of a job, updated from progress events by :meth:`update`."""

    status: str = NOT_STARTED
    stage: str | None = None
    step: int = 0
    total: int | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    metrics: dict = field(default_factory=dict)
    val_dice: float | None = None
    message: str = ""
    run_dir: str | None = None
    model_dir: str | None = None
    error: str | None = None
    error_type: str | None = None
    stages_done: list = field(default_factory=list)
    returncode: int | None = None
    events: int = 0
    #: messages of the backend's ``log`` events with level ``warning`` (e.g. a student that does
    #: not match its teacher, a class labelled on one slice), shown when the job ends
    warnings: list = field(default_factory=list)
    #: ``tskd segment``: per output file (normalised path), the file's slice numbers most likely
    #: to need a correction, most likely first (the progress events' ``metrics.check_slices``)
    check_slices: dict = field(default_factory=dict)
    #: ``tskd segment``: per output file, the factor its intensities were scaled by to match the
    #: model's training scans (``metrics.intensity_factor``; 1.0: not scaled)
    intensity_factors: dict = field(default_factory=dict)

    @property
    def stage_fraction(self) -> float | None:
        """Progress of the current stage in [0, 1], None when the total is unknown."""
        if not self.total:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    @property
    def overall_fraction(self) -> float:
        """Progress of a whole training run in [0, 1] from the stage weights."""
        if self.status == DONE:
            return 1.0
        done = sum(STAGE_WEIGHTS.get(s, 0.0) for s in set(self.stages_done))
        if self.stage and self.stage not in self.stages_done:
            done += STAGE_WEIGHTS.get(self.stage, 0.0) * (self.stage_fraction or 0.0)
        return min(done / sum(STAGE_WEIGHTS.values()), 1.0)

    @property
    def stage_label(self) -> str:
        return STAGE_LABELS.get(self.stage or "", self.stage or "")

    def summary(self) -> str:
        """One line for a status label, e.g. ``"Distilling the student 120/400, ETA 3 min 10 s"``."""
        if self.status == FAILED:
            return f"Failed: {self.error or 'see the log'}"
        if self.status == CANCELLED:
            return "Cancelled (the run can be resumed)"
        if self.status == DONE:
            if self.warnings:
                return f"Finished with {len(self.warnings)} warning(s): {self.warnings[0]}"
            return "Finished"
        parts = [self.stage_label or "Starting"]
        if self.total:
            parts.append(f"{self.step}/{self.total}")
        if self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if self.val_dice is not None:
            parts.append(f"val Dice {self.val_dice:.3f}")
        return ", ".join(parts)

    def update(self, event: dict) -> None:
        """Apply one progress event (schema version 1; unknown fields ignored)."""
        self.events += 1
        kind = event.get("event")
        stage = event.get("stage")
        if stage:
            if stage != self.stage:
                self.step, self.total, self.eta_s = 0, None, None
            self.stage = stage
        for key in ("step", "total", "eta_s", "elapsed_s"):
            if key in event and (event[key] is None or isinstance(event[key], (int, float))):
                setattr(self, key, event[key])
        metrics = event.get("metrics")
        if isinstance(metrics, dict) and metrics:
            self.metrics.update(metrics)
            for key in ("val_dice", "dice", "mean_dice"):
                value = metrics.get(key)
                if isinstance(value, (int, float)):
                    self.val_dice = float(value)
                    break
        if isinstance(event.get("message"), str) and event["message"]:
            self.message = event["message"]
            check = metrics.get("check_slices") if isinstance(metrics, dict) else None
            if isinstance(check, list) and all(isinstance(k, int) for k in check):
                self.check_slices[os.path.normpath(event["message"])] = list(check)
            factor = metrics.get("intensity_factor") if isinstance(metrics, dict) else None
            if isinstance(factor, (int, float)) and not isinstance(factor, bool):
                self.intensity_factors[os.path.normpath(event["message"])] = float(factor)
        if kind == "start":
            self.status = RUNNING
            self.run_dir = event.get("message") or self.run_dir
        elif kind == "stage_end" and stage:
            self.stages_done.append(stage)
            self.eta_s = 0.0
        elif kind == "log" and event.get("level") == "warning" and isinstance(event.get("message"), str):
            if event["message"] not in self.warnings:
                self.warnings.append(event["message"])
        elif kind == "done":
            self.status = DONE
            self.model_dir = event.get("message") or self.model_dir
        elif kind == "error":
            self.status = FAILED
            self.error = event.get("message") or "unknown error"
            self.error_type = event.get("error_type")


# ---------------------------------------------------------------------------------------------
# Process tree
# ---------------------------------------------------------------------------------------------

def signal_tree(pid: int | None, kill: bool = False, procs: list | None = None) -> list:
    """Send SIGTERM (``kill``: SIGKILL) to process ``pid`` and its descendants without waiting.

    Returns the processes signalled (psutil objects; ``procs`` are signalled as well, so
    descendants listed earlier are not missed once the parent is gone; ``pid=None``: only
    ``procs``, for a parent already reaped whose pid may be reused). Never blocks.
    """
    if pid is None and psutil is None:  # pragma: no cover
        return []
    if psutil is None:  # pragma: no cover - Windows: TerminateProcess; POSIX: SIGTERM/SIGKILL
        try:
            os.kill(pid, signal.SIGKILL if kill and hasattr(signal, "SIGKILL") else signal.SIGTERM)
        except OSError:
            pass
        return []
    found = list(procs or [])
    try:
        if pid is None:
            raise psutil.NoSuchProcess(0)
        parent = psutil.Process(pid)
        try:
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        found = [parent] + [c for c in children if c not in found] + [p for p in found if p != parent]
    except psutil.NoSuchProcess:
        pass
    # Parent first: it coordinates a clean shutdown; then the children.
    for p in found:
        try:
            p.kill() if kill else p.terminate()
        except psutil.NoSuchProcess:
            pass
    return found


def terminate_tree(pid: int, timeout: float = 10.0) -> None:
    """Stop process ``pid`` and all its descendants, blocking until they are gone.

    SIGTERM first (the backend then checkpoints and exits, leaving the run resumable), SIGKILL for
    whatever is still alive after ``timeout`` seconds. Children are listed before the parent is
    signalled so grandchildren (data loader workers) are not orphaned. The GUI uses the
    non-blocking :meth:`BackendJob.cancel` (``block=False``) instead.
    """
    procs = signal_tree(pid)
    if psutil is None or not procs:  # pragma: no cover
        return
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


# ---------------------------------------------------------------------------------------------
# Job
# ---------------------------------------------------------------------------------------------

class BackendJob:
    """One backend subprocess (``tskd train`` / ``tskd segment``) with progress and cancel.

    Parameters
    ----------
    argv:
        The full command, e.g. ``launcher_prefix(python) + train_args(...)``.
    env, cwd:
        Subprocess environment (see :func:`backend_env`; in Slicer start from
        ``slicer.util.startupEnvironment()``) and working directory.
    on_event:
        ``callable(event_dict, job)`` for every progress event.
    on_log:
        ``callable(line, job)`` for every log line (stderr, and stdout lines that are not events).
    on_finished:
        ``callable(job)`` once, after the process ended and all its output was delivered.
    log_lines:
        How many log lines to keep in :attr:`log` (the GUI log view is capped too).

    All callbacks run inside :meth:`poll` / :meth:`wait`, on the caller's thread.
    """

    def __init__(self, argv: Sequence[str], env: dict | None = None, cwd: str | None = None,
                 on_event: Callable | None = None, on_log: Callable | None = None,
                 on_finished: Callable | None = None, log_lines: int = 2000):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.on_event = on_event
        self.on_log = on_log
        self.on_finished = on_finished
        self.state = JobState()
        self.log: collections.deque = collections.deque(maxlen=log_lines)
        self.events: list[dict] = []
        self.process: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._cancel_requested = False
        self._finished = False
        self._kill_at: float | None = None
        self._cancel_procs: list = []

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> BackendJob:
        """Start the process (returns immediately). Raises ``RuntimeError`` if already running."""
        if self.is_running():
            raise RuntimeError("the job is already running")
        self.state = JobState(status=RUNNING)
        self._kill_at, self._cancel_procs = None, []
        self._cancel_requested = False
        self._finished = False
        self._queue = queue.Queue()
        kwargs = {}
        if os.name == "nt":  # pragma: no cover - hide the console window
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
            **kwargs)
        self.started_at = time.monotonic()
        self.ended_at = None
        self._threads = [
            threading.Thread(target=self._read, args=(self.process.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, "stderr"), daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def restart(self) -> BackendJob:
        """Run the same command again: the backend resumes the run in the same run dir."""
        if self.is_running():
            raise RuntimeError("the job is still running")
        self.argv = [a for a in self.argv if a != "--overwrite"]
        return self.start()

    def is_running(self) -> bool:
        """True until the process ended *and* all its output was delivered by :meth:`poll`."""
        return self.process is not None and not self._finished

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def cancel(self, timeout: float = 20.0, block: bool = True) -> None:
        """Stop the whole process tree (SIGTERM, then SIGKILL after ``timeout``); resumable.

        ``block=True`` waits until the processes are gone (console, Slicer quitting).
        ``block=False`` (the GUI's Cancel) only sends SIGTERM and returns at once; :meth:`poll`
        sends SIGKILL to whatever is still alive ``timeout`` seconds later. Either way the job's
        final state (``cancelled``) is delivered by :meth:`poll`.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self._cancel_requested = True
        if block:
            terminate_tree(self.process.pid, timeout=timeout)
            return
        self._cancel_procs = signal_tree(self.process.pid, procs=self._cancel_procs)
        self._kill_at = time.monotonic() + timeout

    def _enforce_cancel(self) -> None:
        """SIGKILL the tree once the grace period of a non-blocking cancel has passed."""
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._kill_at = None
            self._cancel_procs = signal_tree(self.process.pid, kill=True, procs=self._cancel_procs)

    # -- output ------------------------------------------------------------------------------
    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (ValueError, OSError):  # stream closed under us
            pass
        finally:
            self._queue.put((name, None))

    def poll(self, max_lines: int = 500) -> bool:
        """Deliver pending output and the end of the job; returns True while the job runs.

        Call it from a timer on the GUI thread (every 100-500 ms). Never blocks.
        """
        if self.process is None or self._finished:
            return False
        self._enforce_cancel()
        for _ in range(max_lines):
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            event = parse_progress_line(line) if name == "stdout" else None
            if event is None and name == "stderr":
                # Some backends print events on stderr by mistake; accept them defensively.
                event = parse_progress_line(line) if '"event"' in line and '"v"' in line else None
            if event is not None:
                self.events.append(event)
                if len(self.events) > 5000:
                    del self.events[:2500]
                self.state.update(event)
                if self.on_event:
                    self.on_event(event, self)
            else:
                self.log.append(line)
                if self.on_log:
                    self.on_log(line, self)
        if self.process.poll() is not None and self._queue.empty() and \
                not any(t.is_alive() for t in self._threads):
            if self._kill_at is not None:  # the parent is gone: no child of it may outlive the job
                self._cancel_procs = signal_tree(None, kill=True, procs=self._cancel_procs)
                self._kill_at = None
            self._finish()
            return False
        return True

    def _finish(self) -> None:
        self._finished = True
        self.ended_at = time.monotonic()
        rc = self.process.returncode
        self.state.returncode = rc
        if self._cancel_requested:
            self.state.status = CANCELLED
        elif rc == 0 and self.state.status != FAILED:
            self.state.status = DONE
        else:
            self.state.status = FAILED
            if not self.state.error:
                tail = [line for line in list(self.log)[-20:] if line.strip()]
                last = tail[-1] if tail else ""
                self.state.error = f"The backend exited with code {rc}." + (f" Last output: {last}" if last else "")
        if self.on_finished:
            self.on_finished(self)

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> str:
        """Poll until the job ends (console use, tests); returns the final status.

        Raises ``TimeoutError`` after ``timeout`` seconds (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job still running after {timeout} s")
            time.sleep(interval)
        return self.state.status

    def wait_for(self, predicate: Callable[[BackendJob], bool], timeout: float = 60.0,
                 interval: float = 0.05) -> bool:
        """Poll until ``predicate(job)`` is true (True) or the job ended / timed out (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.poll()
            if predicate(self):
                return True
            if not running:
                return False
            time.sleep(interval)
        return False

    def __repr__(self) -> str:
        return f"<BackendJob {self.state.status} {' '.join(self.argv[-6:])!r}>"


class JobRegistry:
    """All jobs started in this process, so they can be stopped when Slicer quits."""

    def __init__(self):
        self._jobs: list[BackendJob] = []

    def add(self, job: BackendJob) -> BackendJob:
        self._jobs = [j for j in self._jobs if j.is_running()]
        self._jobs.append(job)
        return job

    def running(self) -> list[BackendJob]:
        return [j for j in self._jobs if j.process is not None and j.process.poll() is None]

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Stop every running job (SIGTERM first, so runs stay resumable)."""
        for job in self.running():
            job.cancel(timeout=timeout)


JOBS = JobRegistry()
