"""Issue 13 benchmarks: in-process interactive segmentation on a real MRML scene (slicer-core).

    python benchmarks/bench_interactive.py click  [--model PKG] [--repeats 15]
    python benchmarks/bench_interactive.py volume [--model PKG]
    python benchmarks/bench_interactive.py update --run RUN_DIR [--slices 5,10] [--threads 1]

* ``click``: one 512x512 slice of the bundled DICOM CT, "click to labels in the segmentation
  node" (``InteractiveSegmenter.segment`` of one slice: inference + masking + undo state + write).
  First click after choosing the model (session creation, checksum, volume set-up) and the median
  of the following clicks on other slices (warm session).
* ``volume``: the bundled 512x512x20 CT stacked five times into a 512x512x100 volume, every slice
  into a segmentation node in chunks of 16 (progress callback as the effect's dialog uses).
* ``update``: ``tskd update`` of a run of the bundled CT (``bash scripts/demo.sh`` makes one in ``runs/demo/run``) after
  "correcting" 2 slices (their reference labels): wall time and Dice on those slices before/after.

``--model``: a model package, e.g. the demo's trained student ``runs/demo/run/model`` (default: an
untrained U-Net student at S = 256, the ``fast`` preset's architecture, exported to a temporary
folder. Pessimistic: its noisy labels put most pixels on a class boundary, where the exact label
resize of ``tskd segment`` takes its slow path; a trained model is 2-3x faster per slice).
Timings on a shared CPU are pessimistic. Prints the figures; writes nothing in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "TSKDSlicer"))
TOTALSEG = ROOT / "Testing" / "Data" / "totalseg"


def _package(path: str | None, tmp: str) -> str:
    if path:
        return path
    import torch

    from TSKDLib.data.classmap import ClassMap
    from TSKDLib.deploy.export import export_model_package
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.distillation.student import build_student

    torch.manual_seed(0)
    model = build_student("unet-s", num_classes=2, input_size=256)
    out = Path(tmp) / "student256"
    export_model_package(model, out, ClassMap.from_dict({"5": "liver", "1": "spleen"}),
                         dict(Normalization.preset("ct").__dict__), torchscript=False, name="bench")
    return str(out)


def _scene_with_ct(repeat: int = 1):
    import numpy as np
    import slicer

    from TSKDLib.data.io import read_image
    from TSKDSlicerLib import mrml_io

    mrml_io.register_converter_rules()
    scene = slicer.vtkMRMLScene()
    image, _ = read_image(TOTALSEG / "ct_dicom")
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)  # (20, 512, 512) HU
    if repeat > 1:
        arr = np.concatenate([arr] * repeat)
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    vol.SetSpacing(*image.GetSpacing())
    slicer.util.updateVolumeFromArray(vol, arr.astype(np.int16))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    return scene, vol, seg, arr.shape


def cmd_click(args) -> None:
    from TSKDSlicerLib import inprocess, interactive

    with tempfile.TemporaryDirectory() as tmp:
        model = _package(args.model, tmp)
        scene, vol, seg, shape = _scene_with_ct()
        segmenter = inprocess.InteractiveSegmenter(interactive.ModelSessionCache(threads=args.threads))
        t = time.perf_counter()
        segmenter.segment(vol, seg, model, [10])
        first = time.perf_counter() - t
        times = []
        for n in range(args.repeats):
            s = (3 + 7 * n) % shape[0]
            t = time.perf_counter()
            segmenter.segment(vol, seg, model, [s])
            times.append(time.perf_counter() - t)
        print(f"volume {shape} (K, J, I), model input 256, onnxruntime threads {args.threads or 'default'}")
        print(f"first click (load + checksum + set-up + slice): {first * 1000:.0f} ms")
        print(f"warm clicks: median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, "
              f"max {max(times) * 1000:.0f} ms over {len(times)}")


def cmd_volume(args) -> None:
    from TSKDSlicerLib import inprocess, interactive

    with tempfile.TemporaryDirectory() as tmp:
        model = _package(args.model, tmp)
        scene, vol, seg, shape = _scene_with_ct(repeat=5)
        segmenter = inprocess.InteractiveSegmenter(interactive.ModelSessionCache(threads=args.threads))
        pred = segmenter.predictor(vol, model)  # model chosen (first-click cost not counted here)
        t = time.perf_counter()
        ticks = []
        report = segmenter.segment(vol, seg, model, range(shape[0]), chunk=16,
                                   progress=lambda d, n: ticks.append((d, time.perf_counter() - t)))
        total = time.perf_counter() - t
        t = time.perf_counter()
        pred.predict(range(shape[0]))
        infer = time.perf_counter() - t
        print(f"volume {shape} (K, J, I) into a segmentation node: {total:.1f} s "
              f"({len(report['slices'])} slices, {len(ticks)} progress updates; inference alone {infer:.1f} s)")


def cmd_update(args) -> None:
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "v2"
        report = Path(tmp) / "update.json"
        cmd = [sys.executable, "-m", "TSKDLib", "update", str(run / "model"), "--image", str(TOTALSEG / "ct_dicom"),
               "--labels", str(TOTALSEG / "example_seg_dicom.nii.gz"), "--class-map",
               str(TOTALSEG / "label_map_total_ct.json"), "--slices", args.slices, "--out", str(out),
               "--report", str(report), "--device", "cpu", "--run", str(run)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        res = json.loads(report.read_text())
        fmt = (lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
        print(f"tskd update on slices {res['slices']} of the bundled CT: {wall:.0f} s wall "
              f"({res['steps']} steps)")
        print(f"Dice on the corrected slices: before {fmt(res['dice_before'])} (mean {res['mean_before']:.3f}); "
              f"after {fmt(res['dice_after'])} (mean {res['mean_after']:.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("click", "volume"):
        q = sub.add_parser(name)
        q.add_argument("--model")
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--repeats", type=int, default=15)
    q = sub.add_parser("update")
    q.add_argument("--run", required=True)
    q.add_argument("--slices", default="5,10")
    q.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    {"click": cmd_click, "volume": cmd_volume, "update": cmd_update}[args.cmd](args)


if __name__ == "__main__":
    main()
