"""Shared pytest fixtures: paths to the real bundled data (Testing/Data, see its README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
ROOT = Path(__file__).resolve().parent
from TSKDLib.engine.runtime import tune_allocator  # noqa: E402

tune_allocator()  # glibc: large tensors stay in the heap (2x faster teacher steps, TSKDLib/engine/runtime.py)
DATA = ROOT / "Testing" / "Data"
TOTALSEG = DATA / "totalseg"
HC18 = DATA / "hc18"
CT_CLASSES = ["liver", "spleen", "kidney_right", "kidney_left"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return TOTALSEG / "ct_dicom"


@pytest.fixture(scope="session")
def dicom_labels() -> Path:
    return TOTALSEG / "example_seg_dicom.nii.gz"


@pytest.fixture(scope="session")
def ct_label_map() -> Path:
    return TOTALSEG / "label_map_total_ct.json"


@pytest.fixture(scope="session")
def hc18_dir() -> Path:
    return HC18


@pytest.fixture(scope="session")
def torch_threads():
    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return torch.get_num_threads()
