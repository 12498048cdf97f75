"""Saving and loading a fine-tuned teacher: only what training changed.

A teacher directory holds

* ``teacher.safetensors``: the LoRA tensors and the ``(K, 2, 256)`` prompt tokens (a few MB);
* ``teacher.json``: format, backend and base checkpoint (path, size, SHA-256 for the packaged
  LiteMedSAM), LoRA settings, class names, training config and validation figures, and the
  SHA-256 of the tensor file.

Each file is written to a temporary name and moved into place (``TSKDLib.data.io.atomic_write``); the JSON is
written last, so a directory with a ``teacher.json`` is complete. Loading rebuilds the base model
with :func:`~TSKDLib.teacher.backbones.load_foundation_model` and puts the tensors back.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from TSKDLib.errors import CheckpointError, LabelError
from TSKDLib.data.io import atomic_write
from TSKDLib.teacher.backbones import LITEMEDSAM_SHA256, file_sha256, load_foundation_model
from TSKDLib.teacher.lora import LoraSettings
from TSKDLib.teacher.model import TaskSpecificTeacher

FORMAT = "tskd-teacher"
FORMAT_VERSION = 1
WEIGHTS_FILE = "teacher.safetensors"
META_FILE = "teacher.json"


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def save_teacher(teacher: TaskSpecificTeacher, directory: str | Path, config=None,
                 history: dict | None = None) -> Path:
    """Write the trained part of ``teacher`` to ``directory`` (created if needed).

    Parameters
    ----------
    teacher:
        The fine-tuned :class:`TaskSpecificTeacher`.
    directory:
        Output folder; existing teacher files in it are replaced atomically.
    config:
        Optional :class:`~TSKDLib.teacher.training.TeacherConfig` recorded in the JSON.
    history:
        Optional training history; its summary (not the per-step loss) is recorded.

    Returns
    -------
    Path of ``teacher.json``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in teacher.trainable_state_dict().items()}
    weights = directory / WEIGHTS_FILE
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}), overwrite=True)
    base = Path(teacher.backbone.checkpoint) if teacher.backbone.checkpoint else None
    lora = teacher.lora_settings
    summary = None
    if history:
        summary = {k: history.get(k) for k in ("best_step", "best_val_dice", "stopped_early", "steps_run",
                                               "seconds_per_step", "cached_embeddings", "val")}
        summary["final_loss"] = history["loss"][-1] if history.get("loss") else None
    import peft

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": teacher.backbone.backend,
        "base_checkpoint": {"path": str(base) if base else None,
                            "size": base.stat().st_size if base and base.is_file() else None,
                            "sha256": LITEMEDSAM_SHA256 if teacher.backbone.backend == "litemedsam" else None},
        "class_names": teacher.class_names,
        "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets)},
        "adapted_modules": len(teacher.adapted_modules),
        "trainable_parameters": int(sum(v.numel() for v in tensors.values())),
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(weights)},
        "validation": teacher.validation,
        "training": summary,
        "config": config.to_dict() if config is not None else None,
        "versions": {"torch": torch.__version__, "peft": peft.__version__},
    }
    path = directory / META_FILE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(_json_safe(meta), indent=2)), overwrite=True)
    return path


def read_teacher_meta(directory: str | Path) -> dict:
    """The parsed ``teacher.json`` of a teacher directory.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, or an unknown format/version.
    """
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError("no saved teacher here (teacher.json is missing).", path=Path(directory),
                              fix="run the teacher stage first, or point to the folder that holds teacher.json.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"teacher.json is unreadable ({exc}).", path=path,
                              fix="re-run the teacher stage to rewrite it.") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"not a {FORMAT} v{FORMAT_VERSION} file (format {meta.get('format')!r}, "
                              f"version {meta.get('format_version')!r}).", path=path,
                              fix="re-run the teacher stage with this version of TSKD.")
    return meta


def load_teacher(directory: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
                 class_names: Sequence[str] | None = None) -> TaskSpecificTeacher:
    """Rebuild a saved teacher on its base model.

    Parameters
    ----------
    directory:
        Folder written by :func:`save_teacher`.
    device:
        Target device.
    checkpoint:
        Base weight file to use instead of the recorded path (e.g. the SAM file moved).
    class_names:
        If given, must equal the saved class names (guards against mixing tasks).

    Returns
    -------
    The :class:`TaskSpecificTeacher` in eval mode, predictions identical to the saved one.

    Raises
    ------
    CheckpointError
        Missing/corrupt files, tensor-file hash mismatch, base checkpoint missing or changed.
    LabelError
        ``class_names`` differ from the saved ones.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_teacher_meta(directory)
    if class_names is not None and list(class_names) != list(meta["class_names"]):
        raise LabelError(f"the saved teacher segments {meta['class_names']}, not {list(class_names)}.",
                         path=directory, fix="use the class map the teacher was trained with, or retrain it.")
    weights = directory / meta["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError("teacher weights file is missing.", path=weights, fix="re-run the teacher stage.")
    if file_sha256(weights) != meta["weights"]["sha256"]:
        raise CheckpointError("teacher weights do not match the SHA-256 recorded in teacher.json.", path=weights,
                              fix="the folder is corrupt or mixed from two runs: re-run the teacher stage.")
    backend = meta["backend"]
    base = meta["base_checkpoint"]
    ckpt = checkpoint
    if ckpt is None and backend != "litemedsam":
        ckpt = base["path"]
    if ckpt is not None and backend != "litemedsam" and base.get("size") is not None and checkpoint is None:
        p = Path(ckpt)
        if p.is_file() and p.stat().st_size != base["size"]:
            raise CheckpointError(f"base checkpoint changed since the teacher was trained "
                                  f"({p.stat().st_size} bytes, recorded {base['size']}).", path=p,
                                  fix="restore the original file or pass the right one as checkpoint.")
    backbone = load_foundation_model(backend, ckpt)
    lora = meta["lora"]
    teacher = TaskSpecificTeacher(backbone, meta["class_names"],
                                  LoraSettings(lora["rank"], lora["alpha"], lora["dropout"], tuple(lora["targets"])))
    try:
        teacher.load_trainable_state_dict(load_file(str(weights)))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"teacher weights do not fit the model described in teacher.json ({exc}).",
                              path=weights, fix="re-run the teacher stage.") from exc
    teacher.validation = meta.get("validation") or {}
    return teacher.to(device).eval()
