"""Training runs on disk: folders, advanced settings as a backend config file, the command line.

Plain Python (no Slicer, no Qt). The MRML export of each case is done by
:mod:`TSKDSlicerLib.mrml_io`; this module only deals with paths and files.

Where things go:

    <runs folder>/<run name>/inputs/case_000/{image.nrrd, labels.nii.gz, labels.json}
    <runs folder>/<run name>/request.json   # what the module asked for (to resume and retrain)
    <runs folder>/<run name>/...            # the backend's run dir (config.json, state.json, model/ ...)
    <settings dir>/TSKD/models/<model name>/  # the model library (model packages, see models.py)

Runs (image copies, checkpoints: gigabytes) go to ``<Slicer cache folder>/TSKD/runs`` by default
(:func:`default_runs_dir`; on Windows the settings folder roams with the user profile), the
``TSKD/RunsDirectory`` setting moves them, and :func:`delete_run` removes one. The model library
stays in the settings folder and is never touched by run deletion.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable  # noqa: F401 - annotation

from . import jobs

# Foundation models the backend knows (TSKDLib.teacher.backbones.BACKENDS); "default" = preset.
FOUNDATION_MODELS = ("default", "litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")
RETRAIN_MODES = ("rerun pipeline", "fine-tune student")

# Where each advanced setting goes in the backend's config file (``tskd train --config``).
CONFIG_KEYS = {
    "foundation_model": ("teacher", "backend"),       # TSKDLib.teacher.training.TeacherConfig
    "checkpoint": ("teacher", "checkpoint"),
    "lora_rank": ("teacher", "lora_rank"),
    "num_synthetic": ("synthesis", "num_images"),     # TSKDLib.synthesis.SynthesisConfig
    "student": ("student", "arch"),                   # TSKDLib.distillation.student.StudentConfig
    "init_student": ("distillation", "init_student"),  # start from an existing student (retraining)
}


@dataclass
class AdvancedSettings:
    """Optional overrides of the preset. Empty/zero values mean "the preset's value";
    ``num_synthetic`` > 0 also turns the synthesis stage on (``tskd train`` runs it only when asked)."""

    foundation_model: str = "default"
    checkpoint: str = ""
    lora_rank: int = 0
    num_synthetic: int = 0
    student: str = ""
    init_student: str = ""  # a model package to fine-tune from (retraining)

    def overrides(self) -> dict:
        """The backend config dict holding only the settings that were changed."""
        values = {
            "foundation_model": None if self.foundation_model in ("", "default") else self.foundation_model,
            "checkpoint": self.checkpoint or None,
            "lora_rank": self.lora_rank or None,
            "num_synthetic": self.num_synthetic or None,
            "student": self.student or None,
            "init_student": self.init_student or None,
        }
        config: dict = {}
        for key, value in values.items():
            if value is None:
                continue
            section, name = CONFIG_KEYS[key]
            config.setdefault(section, {})[name] = value
        if self.num_synthetic:  # asking for synthetic slices turns the stage on (off by default)
            config["synthesis_enabled"] = True
        return config


def default_data_dir(settings_dir: str | None = None) -> str:
    """``<settings_dir>/TSKD`` (Slicer: the folder of the user settings file), else ``~/.tskd``."""
    if settings_dir:
        return os.path.join(settings_dir, "TSKD")
    return os.path.join(os.path.expanduser("~"), ".tskd")


def default_runs_dir(cache_dir: str | None = None) -> str:
    """``<cache_dir>/TSKD/runs`` (Slicer: ``slicer.app.cachePath``), else ``~/.tskd/runs``."""
    if cache_dir:
        return os.path.join(cache_dir, "TSKD", "runs")
    return os.path.join(os.path.expanduser("~"), ".tskd", "runs")


def delete_run(runs_dir: str, run_dir: str, running: "Iterable[str]" = ()) -> int:
    """Delete one run folder of ``runs_dir``; returns the bytes freed.

    Refuses (``ValueError``) a folder that is not a run directly inside ``runs_dir`` (no
    ``request.json``), and (``RuntimeError``) a run whose job is still running (``running``:
    run dirs of running jobs). The model library is elsewhere and never touched: a finished
    run's model was copied into it when training ended.
    """
    import shutil

    root, target = Path(runs_dir).resolve(), Path(run_dir).resolve()
    if target.parent != root or not (target / "request.json").is_file():
        raise ValueError(f"{run_dir} is not a TSKD run folder of {runs_dir}.")
    if any(Path(r).resolve() == target for r in running):
        raise RuntimeError(f"{target.name} is still running; cancel it first.")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    shutil.rmtree(target)
    return size


def new_run_name(hint: str = "", now: datetime | None = None) -> str:
    """``20261121-194002_liver`` (time first so runs sort by date; ASCII, short for Windows)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    hint = re.sub(r"[^A-Za-z0-9_-]+", "_", hint).strip("_")[:30]
    return f"{stamp}_{hint}" if hint else stamp


@dataclass
class TrainRequest:
    """Everything needed to (re)start ``tskd train`` for a run dir."""

    run_dir: str
    images: list
    labels: list
    labelled_slices: list = field(default_factory=list)  # one spec per case, "" = default
    preset: str = "fast"
    device: str = "auto"
    advanced: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)
    class_map: str = ""  # JSON class map shared by the label files (labels.json of case 0)
    axis: str = "acquisition"  # slice axis (--axis), the same rule as labels.slice_axis_for

    @property
    def config_path(self) -> str:
        return os.path.join(self.run_dir, "tskd-slicer-config.json")

    def write(self) -> str:
        """Write ``request.json`` and the config file (if any override); returns request path."""
        os.makedirs(self.run_dir, exist_ok=True)
        overrides = AdvancedSettings(**self.advanced).overrides() if self.advanced else {}
        if overrides:
            with open(self.config_path, "w", encoding="utf-8") as f:
                json.dump(overrides, f, indent=1)
        path = os.path.join(self.run_dir, "request.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=1)
        return path

    @classmethod
    def read(cls, run_dir: str) -> TrainRequest:
        """Read a run's ``request.json``; raises ``FileNotFoundError`` if it has none."""
        with open(os.path.join(run_dir, "request.json"), encoding="utf-8") as f:
            return cls(**json.load(f))

    def args(self, overwrite: bool = False) -> list[str]:
        """Arguments after ``tskd`` (see :func:`TSKDSlicerLib.jobs.train_args`)."""
        specs = self.labelled_slices if any(self.labelled_slices) else None
        has_config = os.path.isfile(self.config_path)
        return jobs.train_args(self.images, self.labels, self.run_dir, self.preset, self.device,
                               labelled_slices=specs, config=self.config_path if has_config else None,
                               overwrite=overwrite, class_map=self.class_map or None, axis=self.axis or None)


def list_runs(runs_dir: str) -> list[dict]:
    """Runs started from the module, newest first: ``{"run_dir", "name", "finished", "model_dir"}``."""
    out = []
    root = Path(runs_dir)
    if not root.is_dir():
        return out
    for child in sorted(root.iterdir(), reverse=True):
        if not (child / "request.json").is_file():
            continue
        model = child / "model"
        out.append({"run_dir": str(child), "name": child.name,
                    "finished": (model / "model_card.json").is_file(), "model_dir": str(model)})
    return out
