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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``): on a
    shared 2-core machine much faster than two (no oversubscription), and results do not depend
    on the core count. The previous setting is restored after the module."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ct_case():
    """The bundled TotalSegmentator CT (DICOM, 20 slices) with its liver and spleen labels."""
    import warnings

    from TSKDLib.data.case import load_case
    from TSKDLib.data.geometry import LabelGeometryWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        return load_case(TOTALSEG / "ct_dicom", TOTALSEG / "example_seg_dicom.nii.gz",
                         TOTALSEG / "label_map_total_ct.json", classes=["liver", "spleen"])


@pytest.fixture()
def scene():
    """An empty MRML scene of slicer-core (Slicer's MRML without Qt) with the segmentation
    converter rules registered by hand and a subject hierarchy; cleared after the test. Skips
    without slicer-core."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed (no vtkMRMLScene)")
    import sys
    if str(ROOT / "TSKDSlicer") not in sys.path:
        sys.path.insert(0, str(ROOT / "TSKDSlicer"))
    from TSKDSlicerLib import mrml_io

    mrml_io.register_converter_rules()
    s = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(s)
    yield s
    s.Clear(1)
