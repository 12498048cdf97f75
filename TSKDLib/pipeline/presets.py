"""The preset table: preset -> stage -> settings, in one place.

``tskd train --preset NAME`` (and ``PipelineConfig.preset``) sizes every stage from this table;
settings given explicitly (``--config`` file, the Python API) override single fields. The stage
configs read their part through their ``preset(name)`` classmethods
(:class:`TSKDLib.teacher.training.TeacherConfig`, :class:`TSKDLib.synthesis.SynthesisConfig`,
:class:`TSKDLib.distillation.distill.DistillConfig`); a stage absent from a preset uses its config's defaults.
Every stage speaks the same vocabulary (:data:`LEGACY_NAMES` lists older names, still read).

Evidence for the numbers: benchmarks/RESULTS.md (fast: the demo and CHAOS MR on a 2-core CPU).
This module imports nothing, so any module can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESET_NAMES = ("fast", "balanced", "quality")

PRESETS: dict[str, dict[str, dict]] = {
    # CPU. Teacher: LoRA on the decoder attention + prompt tokens on cached encoder embeddings (HC18
    # peaked by step 40, the demo CT plateaus from step 20; no LoRA dropout: ~15 % of a CPU step).
    # Distillation: up to 1400 steps, stopped on evidence after 600 steps and 50 passes over the
    # transfer set (CHAOS scan 34 needed ~900; three scans: ~1400), planned shorter when a slow
    # CPU would need more than 10 minutes (RESULTS.md, section 6).
    "fast": {
        "teacher": dict(lora_targets=("decoder_attn",), lora_dropout=0.0, cache_embeddings=True, steps=60,
                        batch_size=4, lr=2e-3, val_every=10, patience=2, min_delta=0.005),
        "synthesis": dict(resolution=64, block_out_channels=(16, 32, 64), layers_per_block=1, attention=False,
                          steps=150, batch_size=16, lr=2e-3, warmup_steps=10, ema_decay=0.98,
                          checkpoint_every=25, sampler="ddim", sample_steps=20, num_images=32,
                          sample_batch_size=16),
        "distillation": dict(steps=1400, finetune_steps=40, batch_size=4, min_steps=600, min_epochs=50,
                             max_seconds=600.0),
    },
    # The paper's teacher (LoRA in encoder and decoder attention: the TeacherConfig defaults).
    "balanced": {
        "teacher": dict(),
        "synthesis": dict(resolution=64, block_out_channels=(32, 64, 128), layers_per_block=2, attention=False,
                          steps=2000, batch_size=16, lr=1e-3, warmup_steps=50, ema_decay=0.995,
                          checkpoint_every=100, sampler="dpm", sample_steps=25, num_images=200,
                          sample_batch_size=32),
        "distillation": dict(steps=3000, finetune_steps=150, min_epochs=50),
    },
    # A GPU.
    "quality": {
        "teacher": dict(steps=600, patience=6),
        "synthesis": dict(resolution=96, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                          attention=True, steps=10000, batch_size=32, lr=3e-4, warmup_steps=200,
                          ema_decay=0.999, checkpoint_every=500, sampler="dpm", sample_steps=30,
                          num_images=1000, sample_batch_size=64),
        "distillation": dict(steps=8000, finetune_steps=400, batch_size=8, patience=5, min_epochs=50),
    },
}

#: older stage-level preset names, still accepted by the stage configs' ``preset()``
ALIASES = {"paper": "balanced", "default": "balanced", "full": "quality"}


def stage_preset(name: str, stage: str) -> dict:
    """A copy of ``PRESETS[name][stage]`` (``name`` may be an alias); raises
    :class:`~TSKDLib.errors.ConfigError` for an unknown preset."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        from TSKDLib.errors import ConfigError
        raise ConfigError(f"unknown {stage} preset {name!r}.", fix=f"use one of {', '.join(PRESET_NAMES)}.")
    return dict(PRESETS[key].get(stage, {}))


#: The one vocabulary of training settings, shared by the teacher, synthesis and distillation
#: configs: ``steps``, ``batch_size``, ``lr``, ``warmup_steps``, ``weight_decay``, ``seed``,
#: ``device``, ``threads``, ``checkpoint_every``. Names of older config files, still read:
LEGACY_NAMES = {"warmup": "warmup_steps", "learning_rate": "lr", "train_steps": "steps",
                "num_threads": "threads", "check_every": "val_every"}


def upgrade_names(values: dict, stage: str) -> dict:
    """A copy of ``values`` with the older setting names (:data:`LEGACY_NAMES`) renamed. Raises
    :class:`~TSKDLib.errors.ConfigError` when a setting is given under both names."""
    out = dict(values)
    for old, new in LEGACY_NAMES.items():
        if old in out:
            if new in out:
                from TSKDLib.errors import ConfigError
                raise ConfigError(f"{stage} setting {new!r} is given twice (also as its older name {old!r}).",
                                  fix=f"keep only {new!r}.")
            out[new] = out.pop(old)
    return out


@dataclass
class TrainingSettings:
    """The settings every training stage has, under one name each (base of
    :class:`~TSKDLib.teacher.training.TeacherConfig`, :class:`~TSKDLib.synthesis.SynthesisConfig`
    and :class:`~TSKDLib.distillation.distill.DistillConfig`, which change some defaults).

    Attributes
    ----------
    steps: optimiser steps (an upper bound where a stage stops early).
    batch_size: samples per step (per process under torchrun).
    lr: peak learning rate (after ``warmup_steps`` of linear warm-up).
    warmup_steps: linear warm-up steps.
    seed: seeds initialisation, batches, augmentation and noise.
    device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    threads: PyTorch CPU threads while the stage trains (None: leave torch's setting).
    checkpoint_every: steps between atomic resume checkpoints.
    """

    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    checkpoint_every: int = 50


@dataclass
class StoppingSettings(TrainingSettings):
    """:class:`TrainingSettings` plus early stopping (:class:`TSKDLib.engine.loop.Plateau`), for the
    stages that validate while they train (teacher, distillation).

    Attributes
    ----------
    val_every: steps between validations (the distillation's evidence checks).
    patience: validations in a row without a gain of ``min_delta`` before training stops.
    min_delta: the smallest gain of the validation score that counts as progress.
    """

    val_every: int = 50
    patience: int = 3
    min_delta: float = 0.0
