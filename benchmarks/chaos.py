"""The CHAOS MR T2 dev scans of the issue-15 benchmarks, in one place: their numbers, where they
are (``../shared/data/chaos_mr_t2_dev`` beside the checkout, or ``--data``) and how a scan is read.

The data are non-commercial (the folder's SOURCE.md): benchmarks only, never copied into the
project. Layout: ``images/image_N.nii.gz``, ``labels/label_N.nii.gz`` (expert labels: liver, right
and left kidney, spleen) and ``labels.json`` (label value -> class name).
"""

from __future__ import annotations

from pathlib import Path

#: the five dev scans, in the order the benchmarks index them (``--train-groups 0,1,2`` = 31-33)
SCANS = (31, 32, 33, 34, 36)
#: the shared data folder beside the checkout
DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chaos_mr_t2_dev"


def scan_files(data: str | Path, scan: int) -> tuple[Path, Path]:
    """``(image, labels)`` paths of CHAOS scan ``scan`` in ``data``."""
    d = Path(data)
    return d / "images" / f"image_{scan}.nii.gz", d / "labels" / f"label_{scan}.nii.gz"


def load_scan(data: str | Path, scan: int, **kwargs):
    """CHAOS scan ``scan`` of ``data`` as a :class:`TSKDLib.data.case.Case` with its complete
    reference labels (``kwargs`` go to :func:`TSKDLib.data.case.load_case`)."""
    from TSKDLib.data.case import load_case

    return load_case(*scan_files(data, scan), Path(data) / "labels.json", **kwargs)
