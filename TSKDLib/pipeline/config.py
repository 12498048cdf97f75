"""One validated configuration for the whole job (``tskd train``), with presets.

The effective configuration is saved as ``RUN_DIR/config.json``; running the same command again
on the same run directory resumes it. Stage settings are validated by the stage's own config
class (:class:`TSKDLib.teacher.training.TeacherConfig`, the synthesis and distillation configs).

Presets size every stage:

- ``fast``: CPU-friendly; the bundled demo (20-slice CT) trains in about 8 minutes on a quiet
  2-core CPU (benchmarks/RESULTS.md, section 5). Teacher adapts the mask decoder + class prompts
  on cached encoder embeddings.
- ``balanced``: the paper's teacher (LoRA in encoder and decoder), longer synthesis and
  distillation; minutes on a GPU, about an hour on a laptop CPU.
- ``quality``: longer still; meant for a GPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from TSKDLib.errors import ConfigError
from TSKDLib.pipeline.presets import PRESET_NAMES as PRESETS  # the table itself: TSKDLib.pipeline.presets.PRESETS


def tiny_config() -> dict:
    """Stage overrides for a smoke run of about a minute on 2 CPU cores (tests, CI, the Slicer
    module's self-test). Results are meaningless; every code path runs.

    Use as ``PipelineConfig(**tiny_config(), data=...)`` or as a ``--config`` JSON file."""
    return {
        "preset": "fast",
        "teacher": {"steps": 4, "batch_size": 2, "val_every": 2, "checkpoint_every": 2, "warmup_steps": 1},
        "synthesis": {"steps": 4, "batch_size": 4, "num_images": 4, "sample_steps": 3,
                      "sample_batch_size": 4, "checkpoint_every": 2, "min_confidence": 0.0,
                      "block_out_channels": [8, 16, 16]},
        "distillation": {"steps": 6, "finetune_steps": 2, "batch_size": 2, "checkpoint_every": 2,
                         "log_every": 1},
    }


@dataclass
class DataConfig:
    """Inputs. ``labelled_slices[i]`` lists labelled slice indices of ``images[i]`` (the file's own
    slice indices along the slice axis). ``axis``: ``acquisition`` (default: the scan's own
    slices, even when oblique), ``axial``, ``coronal`` or ``sagittal`` (near-isotropic volumes);
    see :func:`TSKDLib.data.geometry.slice_frame`."""

    images: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    class_map: str | None = None
    classes: list[str] | None = None
    labelled_slices: list[list[int] | None] | None = None
    axis: str = "acquisition"
    size: int = 256
    normalization: str = "auto"
    mask_threshold: int | None = None


@dataclass
class PipelineConfig:
    """Everything ``tskd train`` does, in one object.

    Attributes
    ----------
    preset: ``fast`` | ``balanced`` | ``quality`` (sizes every stage; explicit stage settings win).
    data: :class:`DataConfig`.
    teacher, synthesis, distillation, student: stage settings (dicts of the stage config fields,
        overriding the preset). ``distillation["init_student"]``: a model package or run directory
        whose student is the starting point (retraining after corrections) instead of a new one.
    synthesis_enabled: run stage 2 (diffusion synthesis); off = "TS-KD without synthesis". None
        (default) = off, on every device (recorded as False in config.json): at the ``fast``
        budgets on a CPU and at the ``balanced`` budgets on an H200 GPU no synthetic slice passed
        the teacher-agreement check (0 of 32, and 0 of 200 on each of 4 scans; condition Dice
        0.00-0.32), so the stage cost minutes and added nothing (benchmarks/RESULTS.md, sections
        1, 3, 6 and 8). ``quality``'s synthesis (10 000 steps, 96 px) is unmeasured.
    device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
    threads: CPU threads for PyTorch (None: PyTorch's default).
    seed: seeds every stage.
    """

    preset: str = "fast"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: dict = field(default_factory=dict)
    synthesis: dict = field(default_factory=dict)
    distillation: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    synthesis_enabled: bool | None = None
    device: str = "auto"
    threads: int | None = None
    seed: int = 0

    def validate(self) -> "PipelineConfig":
        """Check values and build every stage config once (raising :class:`ConfigError`)."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}.", fix=f"use one of {', '.join(PRESETS)}.")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}.", fix="use auto, cpu, cuda or cuda:N.")
        d = self.data
        if not d.images:
            raise ConfigError("no image given.", fix="pass at least one image.")
        if d.labels and len(d.labels) != len(d.images):
            raise ConfigError(f"{len(d.images)} images but {len(d.labels)} label files.",
                              fix="give one label file per image (in the same order).")
        if d.labelled_slices is not None and len(d.labelled_slices) != len(d.images):
            raise ConfigError("labelled slices must be given per image.",
                              fix="repeat --labelled-slices once per image (in the same order).")
        if d.size < 64 or d.size % 16:
            raise ConfigError(f"model size {d.size} must be a multiple of 16 and >= 64.")
        from TSKDLib.data.geometry import AXIS_CHOICES
        if d.axis not in AXIS_CHOICES:
            raise ConfigError(f"unknown slice axis {d.axis!r}.", fix=f"use {', '.join(AXIS_CHOICES)}.")
        self.stage_configs()
        return self

    # -- stage configs -----------------------------------------------------------------------
    def stage_configs(self, device: str | None = None) -> dict[str, Any]:
        """New stage config objects: the preset's row of :data:`TSKDLib.pipeline.presets.PRESETS`, then
        ``seed``/``device``/``threads``, then the explicit stage settings (older setting names
        are read too). ``device`` replaces ``self.device`` (the pipeline passes the resolved one).
        Never changes ``self``. Raises :class:`ConfigError` for an invalid setting."""
        from TSKDLib.teacher.training import TeacherConfig
        from TSKDLib.synthesis import SynthesisConfig
        from TSKDLib.distillation.distill import DistillConfig
        from TSKDLib.distillation.student import StudentConfig
        from TSKDLib.pipeline.presets import upgrade_names

        common = {"seed": self.seed, "device": device or self.device, "threads": self.threads}
        distillation = {k: v for k, v in self.distillation.items() if k != "init_student"}

        def settings(stage: str, given: dict) -> dict:
            return {**common, **upgrade_names(given, stage)}
        return {"teacher": TeacherConfig.preset(self.preset, **settings("teacher", self.teacher)),
                "synthesis": SynthesisConfig.preset(self.preset, **settings("synthesis", self.synthesis)),
                "distillation": DistillConfig.preset(self.preset, **settings("distillation", distillation)),
                "student": StudentConfig.from_dict({"input_size": self.data.size, **self.student})}

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown setting(s) {sorted(unknown)}.", fix=f"known: {sorted(known)}.")
        dd = dict(data.pop("data", {}) or {})
        dknown = {f.name for f in fields(DataConfig)}
        if set(dd) - dknown:
            raise ConfigError(f"unknown data setting(s) {sorted(set(dd) - dknown)}.")
        return cls(data=DataConfig(**dd), **data)

    @classmethod
    def from_file(cls, path: str | Path) -> "PipelineConfig":
        """Read a JSON config file (same structure as ``RUN_DIR/config.json``)."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError("config file not found.", path, "Check the path.") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON ({exc}).", path) from None
        except ConfigError as exc:
            raise ConfigError(str(exc), path) from None

    def resume_key(self) -> dict:
        """The parts of the config that change results (threads and device do not)."""
        d = self.to_dict()
        d.pop("threads", None)
        d.pop("device", None)
        return d
