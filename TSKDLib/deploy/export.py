"""Model package export: ONNX + TorchScript + model card, written atomically (docs/design.md).

A model package is a directory::

    model.onnx        input "image" (N, 1, S, S) float32 in [0, 1] -> output "logits" (N, K+1, S, S)
    model.ts          TorchScript (traced) of the same network (optional for inference)
    model_card.json   format "tskd-model" v1: classes (index, label value, name, colour),
                      input_size, slice_axis, acquisition (training scans' acquisition planes),
                      normalization, student, training, validation, teacher, versions, files
                      (SHA-256 of every file)

It is built in ``<dir>.tmp-<pid>`` beside the target and renamed into place, so a reader never
sees a half-written package; an existing package is only replaced when ``overwrite`` is True.
Reading and checking a package without PyTorch: :func:`TSKDLib.deploy.inference.load_model_package`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from TSKDLib.data.classmap import ClassMap
from TSKDLib.errors import ModelPackageError, RunExistsError
from TSKDLib.data.io import atomic_dir

FORMAT = "tskd-model"
FORMAT_VERSION = 1
ONNX_OPSET = 17


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict:
    """Versions of TSKD and of the libraries that produced the package."""
    from TSKDLib.version import __version__

    out = {"tskd": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("monai", "onnx", "onnxruntime", "timm", "SimpleITK"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", None) or getattr(m, "Version_VersionString", lambda: None)()
        except ImportError:
            out[mod] = None
    return out


class _Export(torch.nn.Module):
    """``image -> logits`` wrapper (drops feature outputs and hooks from the graph)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image)


def export_onnx(model: torch.nn.Module, path: str | Path, input_size: int, opset: int = ONNX_OPSET) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis (``image`` -> ``logits``), legacy
    TorchScript-based exporter (no onnxscript needed)."""
    import warnings

    wrapper = _Export(model).eval()
    dummy = torch.zeros(1, 1, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, dummy, str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    import onnx

    onnx.checker.check_model(str(path))
    return Path(path)


def export_torchscript(model: torch.nn.Module, path: str | Path, input_size: int) -> Path:
    """Trace ``model`` to TorchScript (``torch.jit.load`` then ``m(image) -> logits``)."""
    import warnings

    wrapper = _Export(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, torch.zeros(1, 1, input_size, input_size))
    traced.save(str(path))
    return Path(path)


def export_model_package(model: torch.nn.Module, out_dir: str | Path, class_map: ClassMap,
                         normalization: dict, input_size: int | None = None, slice_axis: str = "acquisition",
                         name: str | None = None, training: dict | None = None, validation: dict | None = None,
                         teacher: dict | None = None, student: dict | None = None, torchscript: bool = True,
                         overwrite: bool = False, check: bool = True, acquisition: dict | None = None,
                         postprocessing: dict | None = None) -> Path:
    """Write a model package directory atomically.

    Parameters
    ----------
    model:
        The trained student (``(N,1,S,S) -> (N,K+1,S,S)``); it is exported in eval mode on the CPU.
    out_dir:
        Package directory to create.
    class_map:
        The task's classes; K must equal the network's output channels - 1.
    normalization:
        The normalisation dict recorded by the data layer (``Normalization.to_dict()`` plus the
        fitted ``lo``/``hi``); inference re-fits percentile normalisations on each new scan.
    input_size:
        S (default: ``model.config.input_size``).
    slice_axis:
        ``acquisition`` (the scan's own slices), ``axial``, ``coronal`` or ``sagittal``
        (:func:`TSKDLib.data.geometry.slice_frame`).
    acquisition:
        ``{"planes": [...], "directions": [[x, y, z], ...]}``: the training scans' acquisition
        planes and slice normals (LPS); ``tskd segment`` refuses scans acquired in another plane
        (:func:`TSKDLib.deploy.inference.check_acquisition_plane`).
    training, validation, teacher, student:
        Model-card entries (``validation`` as ``{"dice": {...}}``); ``student`` defaults to
        :func:`TSKDLib.distillation.student.describe_student`.
    postprocessing:
        Model-card entry ``{"one_object": [class names], ...}``: the classes of which ``tskd
        segment`` removes the components under a fifth of the largest one (one-object classes,
        :func:`TSKDLib.distillation.distill.single_object_classes`).
    overwrite:
        Replace an existing package (the old one is removed only after the new one is in place).
    check:
        Run the ONNX model with onnxruntime and compare with PyTorch (max abs logit difference
        must be < 1e-4, else :class:`ModelPackageError`).

    Raises
    ------
    RunExistsError
        ``out_dir`` exists and ``overwrite`` is False.
    ModelPackageError
        Class count mismatch or ONNX/PyTorch disagreement.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise RunExistsError("model package exists and would be overwritten.", out_dir,
                             "Choose another output folder or pass --overwrite.")
    model = model.eval().cpu()
    cfg = getattr(model, "config", None)
    size = int(input_size or getattr(cfg, "input_size", 256))
    with torch.no_grad():
        probe = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
        ref = model(probe)
    if ref.shape[1] != class_map.num_classes + 1:
        raise ModelPackageError(f"network outputs {ref.shape[1]} channels but the class map has "
                                f"{class_map.num_classes} classes (+ background).")
    if student is None:
        from TSKDLib.distillation.student import describe_student
        student = describe_student(model) if hasattr(model, "config") else {}
    # A full disk, a permission or a read-only file system is one line (WriteError); the previous
    # package stays in place (the new one is built beside it and swapped in by replace_dir).
    with atomic_dir(out_dir) as tmp:
        export_onnx(model, tmp / "model.onnx", size)
        if torchscript:
            export_torchscript(model, tmp / "model.ts", size)
        if check:
            _check_onnx(tmp / "model.onnx", probe, ref, out_dir)
        card = _model_card(name or out_dir.name, class_map, size, slice_axis, acquisition, normalization,
                           student, training, validation, teacher)
        card["postprocessing"] = _jsonable(postprocessing or {"one_object": []})
        card["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / "model_card.json").write_text(json.dumps(card, indent=1))
    return out_dir


def _check_onnx(onnx_path: Path, probe: torch.Tensor, ref: torch.Tensor, out_dir: Path) -> None:
    """Run the exported ONNX model with onnxruntime on ``probe`` ``(2, 1, S, S)`` and compare with
    PyTorch's logits ``ref``; raises :class:`ModelPackageError` when the max abs difference is
    1e-4 or more."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": probe.numpy()})[0]
    diff = float(np.abs(got - ref.numpy()).max())
    if not diff < 1e-4:
        raise ModelPackageError(f"ONNX export disagrees with PyTorch (max |logit diff| = {diff:.3g}).",
                                out_dir, "Report this as a bug with the student architecture.")


def _model_card(name: str, class_map: ClassMap, size: int, slice_axis: str, acquisition, normalization,
                student, training, validation, teacher) -> dict:
    """``model_card.json`` without its ``files`` checksums (see :func:`export_model_package`)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "classes": class_map.to_json_dict()["classes"],
        "ignored_values": [int(v) for v in class_map.ignored_values],
        "input_size": size, "slice_axis": slice_axis, "acquisition": _jsonable(acquisition or {}),
        "normalization": _jsonable(normalization),
        "inputs": {"image": ["N", 1, size, size]}, "outputs": {"logits": ["N", class_map.num_classes + 1, size, size]},
        "student": _jsonable(student), "training": _jsonable(training or {}),
        "validation": _jsonable(validation or {}), "teacher": _jsonable(teacher or {}),
        "versions": tool_versions(),
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path) or isinstance(obj, torch.device):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
