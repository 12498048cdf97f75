"""Progress reporting for long jobs: terminal bars for people, JSON lines for programs.

The JSON-lines schema (version 1) is documented in ``docs/design.md`` and is the machine
interface the Slicer module reads (``tskd train --progress-json``). In JSON mode nothing but
the JSON objects is written to stdout; human logs go to stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

SCHEMA_VERSION = 1
STAGES = ("prepare", "teacher", "synthesis", "distillation", "export", "segment", "benchmark")
EVENTS = ("start", "stage_start", "progress", "stage_end", "log", "done", "error")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean(value: Any) -> Any:
    """Make metric values JSON-safe (numpy/torch scalars to float, NaN/inf to None)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class _Stage:
    name: str
    total: int | None
    start: float = field(default_factory=time.monotonic)
    step: int = 0
    bar: Any = None


class ProgressReporter:
    """Reports stages, steps and metrics of a job.

    Parameters
    ----------
    json_lines:
        If True, write one JSON object per event to ``stream`` (stdout by default) following
        schema version 1; else show a tqdm progress bar per stage on stderr.
    stream:
        Where JSON lines go (default ``sys.stdout``).
    quiet:
        Suppress terminal bars (used in tests and nested calls); JSON lines are never suppressed.
    callback:
        Optional ``callable(event_dict)`` called for every event (Python API users, tests).
    """

    def __init__(self, json_lines: bool = False, stream: IO[str] | None = None,
                 quiet: bool = False, callback=None):
        self.json_lines = json_lines
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.callback = callback
        self._stage: _Stage | None = None
        self.events: list[dict] = []  # last events kept for inspection (bounded)

    # -- low level -------------------------------------------------------------------------
    def emit(self, event: str, stage: str | None = None, **fields: Any) -> dict:
        """Emit one event (see ``EVENTS``); returns the event dict."""
        if event not in EVENTS:
            raise ValueError(f"unknown progress event {event!r}")
        record = {"v": SCHEMA_VERSION, "event": event, "stage": stage, "time": _now()}
        record.update({k: _clean(v) for k, v in fields.items()})
        self.events.append(record)
        if len(self.events) > 1000:
            del self.events[:500]
        if self.json_lines:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        if self.callback is not None:
            self.callback(record)
        return record

    # -- stages ------------------------------------------------------------------------------
    def start(self, message: str = "") -> None:
        self.emit("start", None, message=message)

    def stage_start(self, stage: str, total: int | None = None, message: str = "") -> None:
        """Begin a stage of ``total`` steps (None when unknown)."""
        self._close_bar()
        self._stage = _Stage(stage, total)
        if not self.json_lines and not self.quiet:
            from tqdm.auto import tqdm
            self._stage.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=True,
                                   dynamic_ncols=True)
        self.emit("stage_start", stage, step=0, total=total, elapsed_s=0.0, eta_s=None,
                  metrics={}, message=message)

    def update(self, step: int | None = None, metrics: dict | None = None, message: str = "",
               advance: int = 1) -> None:
        """Report progress in the current stage: absolute ``step`` or ``advance`` steps."""
        st = self._stage
        if st is None:
            raise RuntimeError("ProgressReporter.update() called outside a stage")
        previous = st.step
        st.step = step if step is not None else st.step + advance
        elapsed = time.monotonic() - st.start
        eta = None
        if st.total and st.step > 0:
            eta = elapsed / st.step * max(st.total - st.step, 0)
        if st.bar is not None:
            st.bar.update(st.step - previous)
            if metrics:
                st.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                    for k, v in metrics.items()}, refresh=False)
        self.emit("progress", st.name, step=st.step, total=st.total, elapsed_s=round(elapsed, 3),
                  eta_s=None if eta is None else round(eta, 1), metrics=metrics or {},
                  message=message)

    def stage_end(self, metrics: dict | None = None, message: str = "") -> float:
        """End the current stage; returns its wall time in seconds."""
        st = self._stage
        if st is None:
            return 0.0
        elapsed = time.monotonic() - st.start
        self._close_bar()
        self.emit("stage_end", st.name, step=st.step, total=st.total, elapsed_s=round(elapsed, 3),
                  eta_s=0.0, metrics=metrics or {}, message=message)
        self._stage = None
        return elapsed

    def log(self, message: str, level: str = "info") -> None:
        """A human-readable message; in terminal mode printed on stderr."""
        stage = self._stage.name if self._stage else None
        if not self.json_lines and not self.quiet:
            prefix = "" if level == "info" else f"{level.upper()}: "
            if self._stage is not None and self._stage.bar is not None:
                self._stage.bar.write(prefix + message, file=sys.stderr)
            else:
                print(prefix + message, file=sys.stderr, flush=True)
        self.emit("log", stage, level=level, message=message)

    def done(self, metrics: dict | None = None, message: str = "") -> None:
        self._close_bar()
        self.emit("done", None, metrics=metrics or {}, message=message)

    def error(self, exc: BaseException) -> None:
        stage = self._stage.name if self._stage else None
        self._close_bar()
        self.emit("error", stage, message=str(exc), error_type=type(exc).__name__)

    def _close_bar(self) -> None:
        if self._stage is not None and self._stage.bar is not None:
            self._stage.bar.close()
            self._stage.bar = None


class NullProgress(ProgressReporter):
    """A reporter that records events but prints nothing (library default)."""

    def __init__(self, callback=None):
        super().__init__(json_lines=False, quiet=True, callback=callback)
