"""The main job end to end on the real bundled CT with a tiny budget: train, segment, reload;
SIGTERM and SIGKILL then resume (same final labels as an uninterrupted run); progress JSON
schema; overwrite protection; documented errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, TOTALSEG
from TSKDLib.pipeline.config import tiny_config
from TSKDLib.pipeline.progress import EVENTS, STAGES

pytestmark = pytest.mark.slow

CLASSES = ["liver", "spleen"]
SCAN: Path | None = None  # set by the `scan` fixture


@pytest.fixture(scope="module", autouse=True)
def scan(tmp_path_factory) -> Path:
    """Six real slices (8-13) of the bundled DICOM CT, geometry kept, as NIfTI: the LiteMedSAM
    encoder takes ~2 s per slice on a 2-core CPU, so the tests use a short scan. Its labels stay
    the full label file on its own (flipped) grid: the job pairs them through physical space."""
    global SCAN
    from TSKDLib.data.io import read_image
    image, _ = read_image(TOTALSEG / "ct_dicom")
    SCAN = tmp_path_factory.mktemp("scan") / "ct6.nii.gz"
    sitk.WriteImage(image[:, :, 8:14], str(SCAN))
    return SCAN


def train_cmd(out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "TSKDLib", "train", str(SCAN),
            "--labels", str(TOTALSEG / "example_seg_dicom.nii.gz"),
            "--class-map", str(TOTALSEG / "label_map_total_ct.json"), "--classes", *CLASSES,
            "--labelled-slices", "0,2,4", "--out", str(out), "--config", str(config),
            "--threads", "2", "--synthesis", *extra]  # on a CPU synthesis is off unless asked for


def run(cmd, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.json"
    p.write_text(json.dumps(tiny_config()))
    return p


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny) -> Path:
    """One uninterrupted tiny run (the reference for the resume test)."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    r = run(train_cmd(out, tiny, "--progress-json"))
    assert r.returncode == 0, r.stderr[-3000:]
    (out.parent / "uninterrupted.jsonl").write_text(r.stdout)
    return out


def segment(model: Path, out: Path, *extra) -> np.ndarray:
    r = run([sys.executable, "-m", "TSKDLib", "segment", str(model), str(SCAN),
             "--out", str(out), *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    if "--progress-json" not in extra:  # the slices to check first, numbered like the file (6 slices)
        assert re.search(r"check first: slices? [0-5](, [0-5])*\n", r.stdout), r.stdout
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


def test_train_segment_reload(finished_run, tmp_path):
    model = finished_run / "model"
    assert {"model.onnx", "model_card.json"} <= {p.name for p in model.iterdir()}
    card = json.loads((model / "model_card.json").read_text())
    assert [c["name"] for c in card["classes"]] == CLASSES
    assert [c["value"] for c in card["classes"]] == [5, 1]  # the label file's values
    a = segment(model, tmp_path / "a.nii.gz")
    b = segment(finished_run, tmp_path / "b.nii.gz")  # a run directory works too
    assert np.array_equal(a, b)
    image = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    from TSKDLib.data.io import read_image
    ref, _ = read_image(SCAN)
    assert image.GetSize() == ref.GetSize() == (512, 512, 6)
    assert np.allclose(image.GetSpacing(), ref.GetSpacing()) and np.allclose(image.GetOrigin(), ref.GetOrigin())
    assert np.allclose(image.GetDirection(), ref.GetDirection())
    assert set(np.unique(a)) <= {0, 1, 5}
    state = json.loads((finished_run / "state.json").read_text())
    assert state["finished"] and all(state["stages"][s]["done"] for s in
                                     ("prepare", "teacher", "synthesis", "distillation", "export"))
    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["teacher"]["steps"] == tiny_config()["teacher"]["steps"]
    # a student trained for 8 steps fits nothing: the card says so instead of handing it over silently
    assert list(card["validation"]["teacher_val_dice_per_class"]) == CLASSES  # the gate's reference
    gate = card["validation"]["quality_gate"]
    assert gate["passed"] is False and card["validation"]["warnings"] == gate["warnings"]
    assert any("fits the labelled slices of 'liver' poorly" in w for w in gate["warnings"])
    # one-object classes: no 3D component under a fifth of the largest, unless --all-components
    single = card["postprocessing"]["one_object"]
    assert set(single) <= set(CLASSES)
    # where each class lay (LPS x, y mm from the scan's centre): liver on the patient's right
    where = json.loads((finished_run / "prepare" / "cases.json").read_text())["cases"][0]["class_locations_mm"]
    assert where["liver"][0] < -30 < 30 < where["spleen"][0]
    assert card["postprocessing"]["locations"] == {n: {"centre_mm": where[n][:2], "radius_mm": where[n][2]}
                                                   for n in single}
    # CT: HU are calibrated, so no intensity reference is recorded and no scan is standardised
    cases = json.loads((finished_run / "prepare" / "cases.json").read_text())["cases"]
    assert cases[0]["class_intensity_medians"] == {} and "standardize" not in card["normalization"]
    from scipy import ndimage
    values = {c["name"]: c["value"] for c in card["classes"]}
    for name in single:
        comp, n = ndimage.label(a == values[name])
        sizes = np.bincount(comp.ravel())[1:]
        assert n == 0 or sizes.min() >= 0.2 * sizes.max(), (name, sizes)
    every = segment(model, tmp_path / "all.nii.gz", "--all-components")
    assert set(np.unique(every)) <= {0, 1, 5}
    # the same clean-up without giving removed parts to the one-object class they touch
    from dataclasses import replace

    from TSKDLib.deploy.inference import Cleanup, load_model_package, segment_image
    pkg = load_model_package(model)
    lut = np.array([0] + [values[n] for n in pkg.class_map.names], np.uint8)  # class index -> label value
    assert np.array_equal(lut[sitk.GetArrayFromImage(segment_image(pkg, str(SCAN), cleanup=Cleanup.for_package(pkg)))], a)
    plain = lut[sitk.GetArrayFromImage(segment_image(pkg, str(SCAN), cleanup=replace(Cleanup.for_package(pkg),
                                                                                       reassign_parts=False)))]
    for name in CLASSES:  # keeping every component only adds voxels
        assert ((plain == values[name]) & (every != values[name])).sum() == 0 or name not in single
    assert (plain[a != plain] == 0).all()  # the reassignment labels only what the clean-up had removed


def test_progress_json_lines_follow_the_schema(finished_run):
    lines = (finished_run.parent / "uninterrupted.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every stdout line is JSON
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[-1]["message"].endswith("model")
    seen = set()
    for e in events:
        assert e["v"] == 1 and e["event"] in EVENTS and "time" in e
        assert e["stage"] is None or e["stage"] in STAGES
        if e["event"] in ("progress", "stage_start", "stage_end"):
            assert isinstance(e["step"], int) and (e["total"] is None or isinstance(e["total"], int))
            assert isinstance(e["elapsed_s"], (int, float)) and isinstance(e["metrics"], dict)
            seen.add(e["stage"])
    assert {"prepare", "teacher", "synthesis", "distillation", "export"} <= seen
    assert any("val_dice" in e.get("metrics", {}) for e in events if e["stage"] == "teacher")
    # the quality gate's warnings reach the JSON stream (the Slicer module shows them) and the end
    warned = [e["message"] for e in events if e["event"] == "log" and e.get("level") == "warning"]
    assert any("poorly" in w for w in warned)
    assert events[-1]["metrics"]["warnings"] and set(events[-1]["metrics"]["warnings"]) <= set(warned)


def _start(cmd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)


def _wait_for(proc, predicate, timeout=600):
    t0 = time.monotonic()
    for line in proc.stdout:
        e = json.loads(line)
        if predicate(e):
            return e
        assert time.monotonic() - t0 < timeout
    raise AssertionError(f"process ended (rc={proc.wait()}) before the expected event")


def test_sigterm_and_sigkill_then_resume_give_the_same_labels(finished_run, tiny, tmp_path):
    out = tmp_path / "interrupted"
    cmd = train_cmd(out, tiny, "--progress-json")
    # SIGTERM during synthesis: stops within seconds, exit 130, resumable.
    p = _start(cmd)
    _wait_for(p, lambda e: e["stage"] == "synthesis" and e["event"] == "progress")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    assert rc == 130 and time.monotonic() - t0 < 30
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["teacher"]["done"] and not state["stages"].get("synthesis", {}).get("done")
    # SIGKILL during distillation after a checkpoint.
    p = _start(cmd)
    _wait_for(p, lambda e: e["stage"] == "distillation" and e["event"] == "progress" and e["step"] >= 3)
    p.kill()
    p.wait()
    assert (out / "distillation" / "checkpoints" / "checkpoint.pt").is_file()
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert not any(e["stage"] in ("teacher", "synthesis") and e["event"] == "stage_start" for e in events)
    assert np.array_equal(segment(finished_run / "model", tmp_path / "ref.nrrd"),
                          segment(out / "model", tmp_path / "resumed.nrrd"))


def test_finished_run_and_outputs_are_not_overwritten(finished_run, tiny, tmp_path):
    r = run(train_cmd(finished_run, tiny))
    assert r.returncode == 2 and "finished run" in r.stderr and "--overwrite" in r.stderr
    target = tmp_path / "seg.nii.gz"
    segment(finished_run / "model", target)
    r = run([sys.executable, "-m", "TSKDLib", "segment", str(finished_run / "model"), str(SCAN),
             "--out", str(target)])
    assert r.returncode == 2 and str(target) in r.stderr


def test_bad_inputs_give_documented_errors(tmp_path, tiny):
    missing = tmp_path / "nope.nii.gz"
    r = run([sys.executable, "-m", "TSKDLib", "train", str(missing), "--labels", str(missing),
             "--out", str(tmp_path / "r"), "--progress-json"])
    assert r.returncode == 2 and str(missing) in r.stderr
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["event"] == "error" and last["error_type"] == "InputError"
    r = run(train_cmd(tmp_path / "r2", tiny) + ["--preset", "turbo"])
    assert r.returncode == 2 and "turbo" in r.stderr
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "model_card.json").write_text("{}")
    r = run([sys.executable, "-m", "TSKDLib", "segment", str(broken), str(SCAN),
             "--out", str(tmp_path / "x.nii.gz")])
    assert r.returncode == 2 and "model" in r.stderr and "Fix:" in r.stderr
