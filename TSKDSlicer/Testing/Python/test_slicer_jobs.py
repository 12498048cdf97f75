"""Job runner of the Slicer module (TSKDSlicerLib.jobs / launcher) against real subprocesses.

- Real backend (``python -m TSKDLib``): error surfacing always; train progress, cancel and resume
  when the backend has ``tskd train`` and a tiny-budget config (``TSKDLib.pipeline.config.tiny_config``).
- Launcher mechanics (parent watchdog, process-tree cancel, stdout/stderr separation) with a
  small stand-in backend module written to a temp dir, so they are tested independently of the
  backend's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODULE_DIR = os.path.join(ROOT, "TSKDSlicer")
sys.path.insert(0, MODULE_DIR)

from TSKDSlicerLib import jobs  # noqa: E402

psutil = pytest.importorskip("psutil")
DATA = os.path.join(ROOT, "Testing", "Data", "totalseg")


def _env(extra_path=None):
    env = jobs.backend_env(dict(os.environ), MODULE_DIR, device="cpu")
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env["PYTHONPATH"]
    return env


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

def test_parse_progress_line_is_defensive():
    good = '{"v": 1, "event": "progress", "stage": "teacher", "step": 3, "total": 10}'
    assert jobs.parse_progress_line(good)["step"] == 3
    for line in ("", "   ", "hello", "{not json", "[1, 2]", '{"v": 1}', '{"event": 3}', "{}"):
        assert jobs.parse_progress_line(line) is None


def test_state_follows_events():
    st = jobs.JobState(status=jobs.RUNNING)
    st.update({"event": "start", "message": "/runs/a"})
    st.update({"event": "stage_start", "stage": "prepare", "step": 0, "total": 4})
    st.update({"event": "stage_end", "stage": "prepare", "step": 4, "total": 4})
    st.update({"event": "progress", "stage": "teacher", "step": 50, "total": 100, "eta_s": 61,
               "metrics": {"loss": 0.3, "val_dice": 0.71}})
    assert st.run_dir == "/runs/a" and st.stage == "teacher" and st.val_dice == pytest.approx(0.71)
    assert 0.03 < st.overall_fraction < 0.5
    assert "1 min 01 s" in st.summary() and "0.710" in st.summary()
    st.update({"event": "done", "message": "/runs/a/model", "metrics": {}})
    assert st.status == jobs.DONE and st.model_dir == "/runs/a/model" and st.overall_fraction == 1.0
    err = jobs.JobState(status=jobs.RUNNING)
    err.update({"event": "error", "message": "x.nii: not found", "error_type": "InputError"})
    assert err.status == jobs.FAILED and "x.nii" in err.summary()
    # the backend's warnings (e.g. the quality gate) are kept and shown when the job ends
    w = jobs.JobState(status=jobs.RUNNING)
    gate = "the student reproduces its teacher poorly on 'spleen' (agreement Dice 0.41 < 0.85 ...)"
    w.update({"event": "log", "stage": "distillation", "level": "info", "message": "computing"})
    w.update({"event": "log", "stage": "distillation", "level": "warning", "message": gate})
    w.update({"event": "log", "stage": "distillation", "level": "warning", "message": gate})
    w.update({"event": "done", "message": "/runs/a/model", "metrics": {"warnings": [gate]}})
    assert w.warnings == [gate] and w.status == jobs.DONE
    assert w.summary().startswith("Finished with 1 warning(s)") and "'spleen'" in w.summary()
    # tskd segment: the slices to check first, per output file
    seg = jobs.JobState(status=jobs.RUNNING)
    first, second = os.path.join("predictions", "in_000.nii.gz"), os.path.join("predictions", "in_001.nii.gz")
    seg.update({"event": "stage_start", "stage": "segment", "step": 0, "total": 2})
    seg.update({"event": "progress", "stage": "segment", "step": 1, "metrics": {"seconds": 1.2, "check_slices": [12, 19, 4]},
                "message": first})
    seg.update({"event": "progress", "stage": "segment", "step": 2, "metrics": {"seconds": 1.1, "check_slices": [3]},
                "message": "predictions" + os.sep * 2 + "in_001.nii.gz"})  # normalised
    seg.update({"event": "progress", "stage": "segment", "step": 2, "metrics": {"check_slices": ["x"]}, "message": "/y"})
    assert seg.check_slices == {first: [12, 19, 4], second: [3]}
    # and the factor each file's intensities were scaled by (1.0: not scaled)
    seg.update({"event": "progress", "stage": "segment", "step": 1, "metrics": {"intensity_factor": 1.64},
                "message": first})
    seg.update({"event": "progress", "stage": "segment", "step": 2, "metrics": {"intensity_factor": True},
                "message": second})
    assert seg.intensity_factors == {first: 1.64}


def test_train_args_and_validation():
    args = jobs.train_args(["a.nrrd", "b.nrrd"], ["a.nii.gz", "b.nii.gz"], "/r", "balanced", "cpu",
                           labelled_slices=["1-3", "4"], config="/c.json", overwrite=True)
    assert args[:3] == ["train", "a.nrrd", "b.nrrd"]
    assert args[args.index("--labels") + 1:args.index("--labels") + 3] == ["a.nii.gz", "b.nii.gz"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--labelled-slices"] == ["1-3", "4"]
    assert "--progress-json" in args and args[-1] == "--overwrite" and "/c.json" in args
    assert "--class-map" not in args
    assert jobs.train_args(["a"], ["b"], "/r", class_map="/m.json")[4:6] == ["--class-map", "/m.json"]
    assert jobs.segment_args("/m", ["x", "y"], "/o")[-3:-1] == ["--format", "nii.gz"]
    with pytest.raises(ValueError):
        jobs.train_args(["a"], ["b"], "/r", preset="slow")
    with pytest.raises(ValueError):
        jobs.train_args(["a"], [], "/r")
    with pytest.raises(ValueError):
        jobs.train_args(["a", "b"], ["c", "d"], "/r", labelled_slices=["1"])
    assert jobs.segment_args("/m", ["x.nrrd"], "/o.nii.gz")[:4] == ["segment", "/m", "x.nrrd", "--out"]
    assert jobs.format_duration(3725) == "1 h 02 min" and jobs.format_duration(None) == "?"


def test_backend_env_pythonpath_finds_both_packages():
    env = _env()
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert MODULE_DIR in paths and ROOT in paths  # source tree: TSKDLib at the repo root
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["PYTHONUNBUFFERED"] == "1"


# ---------------------------------------------------------------------------------------------
# Real backend
# ---------------------------------------------------------------------------------------------

def _backend_has(command: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "TSKDLib", "--help"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    return f" {command} " in out.stdout or f"{{{command}" in out.stdout or f",{command}" in out.stdout \
        or f"\n    {command}" in out.stdout


def test_error_surfaces_from_real_backend(tmp_path):
    """A bad input: non-zero exit, FAILED state, the backend's one-line message kept."""
    argv = jobs.launcher_prefix(sys.executable) + ["inspect", str(tmp_path / "missing.nii.gz")]
    job = jobs.BackendJob(argv, env=_env(), cwd=str(tmp_path)).start()
    assert job.wait(timeout=120) == jobs.FAILED
    assert job.returncode not in (0, None)
    assert "missing.nii.gz" in (job.state.error or "") + "\n".join(job.log)


def test_error_event_from_real_train(tmp_path):
    if not _backend_has("train"):
        pytest.skip("backend has no `tskd train` yet")
    argv = jobs.launcher_prefix(sys.executable) + jobs.train_args(
        [str(tmp_path / "missing.nii.gz")], [str(tmp_path / "missing_labels.nii.gz")], str(tmp_path / "run"),
        device="cpu")
    job = jobs.BackendJob(argv, env=_env(), cwd=str(tmp_path)).start()
    assert job.wait(timeout=300) == jobs.FAILED
    assert job.events and job.events[-1]["event"] == "error"
    assert "missing" in job.state.error and job.state.error_type


def _tiny_config(tmp_path):
    try:
        from TSKDLib.pipeline.config import tiny_config  # provided by the backend for tests
    except ImportError:
        pytest.skip("backend provides no tiny-budget config (TSKDLib.pipeline.config.tiny_config) yet")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config()))
    return str(path)


def test_real_train_progress_cancel_resume(tmp_path):
    """tskd train with a tiny budget: events parsed, Cancel stops the tree, resume finishes."""
    if not _backend_has("train"):
        pytest.skip("backend has no `tskd train` yet")
    config = _tiny_config(tmp_path)
    import SimpleITK as sitk
    import numpy as np
    # Six real slices (8-13) of the small CT keep the run short (the teacher's encoder is the
    # slow part on a CPU); liver labels on two of them.
    seg = sitk.ReadImage(os.path.join(DATA, "example_seg.nii.gz"))[:, :, 8:14]
    sitk.WriteImage(sitk.ReadImage(os.path.join(DATA, "example_ct_sm.nii.gz"))[:, :, 8:14],
                    str(tmp_path / "ct6.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    part = np.zeros_like(arr)
    part[[2, 5]] = (arr[[2, 5]] == 5)
    lab = sitk.GetImageFromArray(part)
    lab.CopyInformation(seg)
    sitk.WriteImage(lab, str(tmp_path / "labels.nii.gz"))
    (tmp_path / "labels.json").write_text(json.dumps({"1": "liver"}))
    run = tmp_path / "run"
    argv = jobs.launcher_prefix(sys.executable) + jobs.train_args(
        [str(tmp_path / "ct6.nii.gz")], [str(tmp_path / "labels.nii.gz")], str(run),
        preset="fast", device="cpu", labelled_slices=["2,5"], config=config,
        class_map=str(tmp_path / "labels.json"))
    job = jobs.BackendJob(argv, env=_env(), cwd=str(tmp_path)).start()
    # Cancel once real progress arrived.
    assert job.wait_for(lambda j: any(e["event"] == "progress" for e in j.events), timeout=600), job.log
    pid = job.process.pid
    tree = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    job.cancel(timeout=30)
    assert job.wait(timeout=60) == jobs.CANCELLED
    time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree)
    assert job.state.stage in ("prepare", "teacher", "synthesis", "distillation", "export")
    # Resume: same command, same run dir.
    job.restart()
    assert job.wait(timeout=900) == jobs.DONE, "\n".join(job.log)
    assert os.path.isfile(os.path.join(job.state.model_dir or str(run / "model"), "model_card.json"))


# ---------------------------------------------------------------------------------------------
# Launcher and process tree (stand-in backend module)
# ---------------------------------------------------------------------------------------------

FAKE = textwrap.dedent('''
    """Stand-in backend: JSON progress on stdout, logs on stderr, a child process, SIGTERM-safe."""
    import json, os, signal, subprocess, sys, time
    stop = False
    def on_term(*_):
        global stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    out = sys.argv[1]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(out, "pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    print(json.dumps({"v": 1, "event": "start", "stage": None, "message": out}), flush=True)
    print("a plain line on stdout", flush=True)
    print(json.dumps({"v": 1, "event": "stage_start", "stage": "teacher", "step": 0, "total": 1000}), flush=True)
    for step in range(1, 1000):
        if stop:
            child.terminate(); child.wait()
            with open(os.path.join(out, "stopped_cleanly"), "w") as f:
                f.write(str(step))
            print("stopped cleanly", file=sys.stderr, flush=True)
            sys.exit(143)
        print(json.dumps({"v": 1, "event": "progress", "stage": "teacher", "step": step, "total": 1000,
                          "eta_s": 1000 - step, "metrics": {"val_dice": step / 1000}}), flush=True)
        print(f"log {step}", file=sys.stderr, flush=True)
        time.sleep(0.05)
''')


@pytest.fixture()
def fake_backend(tmp_path):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "fake_tskd.py").write_text(FAKE)
    out = tmp_path / "out"
    out.mkdir()
    return str(pkg), out


def test_cancel_stops_whole_tree_cleanly(fake_backend):
    pkg, out = fake_backend
    argv = [sys.executable, "-m", "TSKDSlicerLib.launcher", "--parent-pid", str(os.getpid()),
            "--module", "fake_tskd", "--", str(out)]
    logs = []
    job = jobs.BackendJob(argv, env=_env(pkg), on_log=lambda line, j: logs.append(line)).start()
    assert job.wait_for(lambda j: j.state.step >= 5, timeout=60), list(job.log)
    assert job.state.stage == "teacher" and job.state.total == 1000 and job.state.val_dice > 0
    assert "a plain line on stdout" in logs and any(line.startswith("log ") for line in logs)
    pids = [int(p) for p in (out / "pids").read_text().split()]
    job.cancel(timeout=20)
    assert job.wait(timeout=30) == jobs.CANCELLED
    assert (out / "stopped_cleanly").exists()  # SIGTERM reached the backend: resumable
    time.sleep(0.3)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_launcher_stops_job_when_parent_dies(fake_backend):
    """Slicer killed: the launcher notices and SIGTERMs the backend (no orphan)."""
    pkg, out = fake_backend
    parent_code = textwrap.dedent(f'''
        import subprocess, sys, os, time
        p = subprocess.Popen([sys.executable, "-m", "TSKDSlicerLib.launcher", "--parent-pid", str(os.getpid()),
                              "--module", "fake_tskd", "--", {str(out)!r}],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(p.pid, flush=True)
        time.sleep(600)
    ''')
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=_env(pkg), stdout=subprocess.PIPE, text=True)
    try:
        launcher_pid = int(parent.stdout.readline())
        deadline = time.time() + 30
        while not (out / "pids").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / "pids").exists()
        parent.kill()
        parent.wait()
        deadline = time.time() + 20
        while psutil.pid_exists(launcher_pid) and time.time() < deadline:
            try:
                if psutil.Process(launcher_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        assert (out / "stopped_cleanly").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in [launcher_pid] if "launcher_pid" in dir() else []:
            jobs.terminate_tree(pid, timeout=2)


def test_registry_cancel_all(fake_backend):
    pkg, out = fake_backend
    argv = [sys.executable, "-m", "TSKDSlicerLib.launcher", "--module", "fake_tskd", "--", str(out)]
    registry = jobs.JobRegistry()
    job = registry.add(jobs.BackendJob(argv, env=_env(pkg)).start())
    assert job.wait_for(lambda j: j.state.step >= 1, timeout=60)
    assert registry.running() == [job]
    registry.cancel_all(timeout=20)
    assert job.wait(timeout=30) == jobs.CANCELLED and registry.running() == []
