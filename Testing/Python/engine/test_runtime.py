"""The CPU allocator setting of training processes (TSKDLib.engine.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

CHECK = ("import json, TSKDLib.engine.runtime as r; first = r.tune_allocator(); "
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


def test_one_device_rule_for_every_stage(monkeypatch):
    """``auto`` follows CUDA's availability; a CUDA request without CUDA is a ConfigError
    naming the device, in the teacher, the synthesis, the distillation and the pipeline alike."""
    import torch

    from TSKDLib.engine import runtime
    from TSKDLib.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:1'"):
        runtime.resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == torch.device("cuda")
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
