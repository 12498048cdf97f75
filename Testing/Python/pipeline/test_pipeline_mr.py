"""``tskd train`` on two MR scans whose intensities differ (the real bundled MR, and a copy of it
with a fluid-bright lesion that darkens every organ after percentile normalisation), tiny
budget: the student learns both scans standardised to one another, and the model card's
reference for ``tskd segment``'s standardisation is what the student saw (benchmarks/RESULTS.md,
section 6, fifteenth pass)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, TOTALSEG
from TSKDLib.pipeline.config import tiny_config

pytestmark = pytest.mark.slow

MR = TOTALSEG / "example_mr_sm.nii.gz"
SEG = TOTALSEG / "example_seg_mr.nii.gz"
MAP = TOTALSEG / "label_map_total_mr.json"
CLASSES = ["liver", "spleen"]


def test_train_standardises_the_training_scans(tmp_path):
    # 12 of the 20 slices (liver and spleen on 2, 6, 10): a short teacher pass
    image = sitk.Cast(sitk.ReadImage(str(MR)), sitk.sitkFloat32)[:, :, 4:16]
    arr = sitk.GetArrayFromImage(image)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG)))[4:16]  # the same grid as the MR
    bright = arr.copy()  # a fluid-bright mass (twice the 99.5th percentile) on 4 % of the organ-free voxels
    free = np.flatnonzero((seg == 0).ravel() & (arr.ravel() > np.percentile(arr, 50)))
    bright.ravel()[free[: int(0.04 * arr.size)]] = 2.0 * np.percentile(arr, 99.5)
    lesion = sitk.GetImageFromArray(bright)
    lesion.CopyInformation(image)
    scans = [tmp_path / "mr.nii.gz", tmp_path / "lesion.nii.gz"]
    sitk.WriteImage(image, str(scans[0]))
    sitk.WriteImage(lesion, str(scans[1]))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config()))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "TSKDLib", "train", *map(str, scans), "--labels", str(SEG), str(SEG),
           "--class-map", str(MAP), "--classes", *CLASSES, "--labelled-slices", "2,6,10",
           "--labelled-slices", "2,6,10", "--out", str(out), "--config", str(config), "--threads", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, check=False,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    medians = [c["class_intensity_medians"] for c in json.loads((out / "prepare" / "cases.json").read_text())["cases"]]
    assert all(medians[0][n] > 1.3 * medians[1][n] for n in CLASSES)  # the lesion darkened both organs
    factors = json.loads((out / "distillation" / "summary.json").read_text())["metrics"]["intensity_factors"]
    ratio = float(np.exp(np.median([np.log(medians[0][n] / medians[1][n]) for n in CLASSES])))
    assert factors[0] < 1.0 < factors[1] and factors[1] / factors[0] == pytest.approx(ratio, rel=1e-3)
    assert "intensity standardisation of the training scans: mr x" in r.stdout + r.stderr
    card = json.loads((out / "model" / "model_card.json").read_text())["normalization"]["standardize"]
    assert card["training_factors"] == factors
    for n in CLASSES:  # the reference is the standardised scans, which now agree
        assert card["class_medians"][0][n] == pytest.approx(medians[0][n] * factors[0], abs=1e-4)
        assert card["class_medians"][1][n] == pytest.approx(card["class_medians"][0][n], rel=0.1)
