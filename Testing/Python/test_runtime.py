"""The CPU allocator setting of training processes (TSKDLib.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

CHECK = ("import json, TSKDLib.runtime as r; first = r.tune_allocator(); "
         "print(json.dumps([first, r.tune_allocator()]))")


def _run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TSKD_MALLOC_TUNING"}
    if env_value is not None:
        env["TSKD_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_allocator_tuning_applies_once_and_can_be_switched_off():
    assert _run(None) == "[true, true]"
    assert _run("0") == "[false, false]"
