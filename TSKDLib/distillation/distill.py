"""Knowledge distillation of a small student from the teacher (TS-KD stage 3), and the baselines.

Method: Liang et al., "Task-specific knowledge distillation from the vision foundation model for
enhanced medical image segmentation", arXiv 2503.06976 (TS-KD), Sec. 3.3: the student learns on a
*transfer set* (labelled slices, unlabelled slices of the user's scans, diffusion-synthesised
slices) from the fine-tuned teacher's outputs and features, then is fine-tuned on the labels.

Losses (each weighted by a :class:`DistillConfig` field)

* ``w_sup`` - supervised Dice + cross-entropy (MONAI :class:`~monai.losses.DiceCELoss`) on
  *labelled* slices only; unlabelled slices (label ``-1``) never reach it.
* ``w_out`` - output distillation on every transfer slice: temperature-scaled KL divergence
  ``tau^2 KL(p_T^tau || p_S^tau)`` (Hinton, Vinyals & Dean, "Distilling the knowledge in a neural
  network", 2015), or per-class BCE against the teacher's soft probabilities. ``p_T^tau =
  softmax(log p_T / tau)``, i.e. exactly the teacher logits divided by ``tau``. Averaged over the
  valid (non-padding) pixels.
* ``w_feat`` - feature distillation (FitNets hints, Romero et al., ICLR 2015): the student's
  bottleneck ``(B, C_b, S/16, S/16)`` is mapped by a learned 1x1 convolution to 256 channels and
  matched to the teacher's image embedding ``(B, 256, 64, 64)`` average-pooled to the same grid,
  by cosine distance (default) or MSE.

Then ``finetune_steps`` steps of supervised fine-tuning on the labelled slices (TS-KD Sec. 3.3).

Methods (``DistillConfig.method``), run by the same code at equal budget (same steps, batch size,
schedule, augmentation), as in the paper's comparisons (Sec. 4):

* ``scratch``: the student trained on the labelled slices only (supervised loss, all steps).
* ``task_agnostic``: feature distillation from the *pre-trained* (not fine-tuned) foundation
  model's embedding (no task probabilities exist), plus the supervised term, then fine-tuning.
* ``tskd``: output + feature distillation from the fine-tuned teacher plus the supervised term,
  then fine-tuning. "TS-KD without synthesis" is ``tskd`` on a transfer set without synthetic
  slices.

Teacher outputs are computed once per transfer slice by :func:`build_teacher_cache` (memory or
``.npy`` memmaps on disk), so the training loop never runs the teacher. Augmentation is a batched
random affine transform applied jointly, in normalised coordinates, to the image, labels, valid
mask, the cached teacher probabilities and the embedding (so cached targets stay aligned), plus
gamma and noise on the image.

Checkpoints are written atomically every ``checkpoint_every`` steps; a run restarted on the same
directory resumes and, with the same seed, ends with the same weights (every step draws its
batch and augmentation from a generator seeded by ``(seed, step)``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from TSKDLib.engine import distributed
from TSKDLib.engine.loop import (Plateau, ResumeFile, Trainer, checkpoint_hook, cpu_threads, settings_identity,
                     trainable_state, warmup_cosine)
from TSKDLib.pipeline.presets import StoppingSettings, upgrade_names
from TSKDLib.errors import CheckpointError, ConfigError, InputError
from TSKDLib.data.io import atomic_write
from TSKDLib.evaluation.metrics import dice_scores
from TSKDLib.pipeline.progress import NullProgress, ProgressReporter
from TSKDLib.engine.runtime import resolve_device
from TSKDLib.distillation.student import StudentConfig, StudentNet, build_student, save_student

log = logging.getLogger(__name__)

METHODS = ("scratch", "task_agnostic", "tskd")
TEACHER_EMBED_DIM = 256
TEACHER_EMBED_SIZE = 64


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class DistillConfig(StoppingSettings):
    """Distillation settings (defaults = the ``default`` preset).

    Attributes
    ----------
    method: ``"tskd"`` (default), ``"task_agnostic"`` or ``"scratch"`` (see module docstring).
    steps: optimiser steps of the distillation phase.
    finetune_steps: optimiser steps of the supervised fine-tune on labelled slices.
    batch_size: slices per step *per process*; under ``torchrun`` with N processes the effective
        batch is ``N * batch_size`` (see :func:`distill`).
    lr, finetune_lr: peak AdamW learning rates of the two phases (cosine decay, linear warm-up
        over ``warmup_steps`` in phase 1).
    weight_decay: AdamW weight decay.
    w_sup, w_out, w_feat: weights of the supervised, output-KD and feature-KD losses.
    temperature: KD temperature ``tau`` (Hinton et al. 2015) of the ``kl`` output loss.
    output_loss: ``"pseudo"`` (default: the teacher's confident, 3D-consistent argmax as hard
        targets, masked Dice + CE; see :func:`teacher_pseudo_labels`), ``"kl"`` (temperature-scaled
        KL on every pixel, the paper's soft targets) or ``"bce"`` (per-class BCE on probabilities).
        Measured on CHAOS MR (benchmarks/RESULTS.md, section 6): all-pixel KL lets background and
        liver pixels drown the kidneys and spleen (``../shared/notes/kd-ablation-chaos.md``),
        while Dice on pseudo-labels weighs every class equally.
    pseudo_threshold: teacher pixels whose top probability is below this are ignored by ``pseudo``
        (FixMatch's confidence mask, Sohn et al. 2020, NeurIPS).
    consistency_3d: per scan and class, keep only the teacher's 3D connected components that touch
        what the user labelled (organs are one object through neighbouring slices); the rest
        becomes background in the pseudo-labels. Without labels of a class in a scan, its
        largest component is kept.
    organ_ends: with ``consistency_3d``, past the outermost labelled slices of a class, what
        widens again after the teacher's organ narrowed to its tip becomes background
        (:func:`beyond_organ_ends`). Measured on CHAOS MR (benchmarks/RESULTS.md, section 6):
        within the labelled scan 0.896 -> 0.914 (5 scans; the livers that ran on into the bowel
        recover), but after training on 3 scans, new scans 0.683 -> 0.657 (3 seeds) with the
        training scans' own slices unchanged: turn it off when the model is mainly for new scans.
    val_every, min_steps, patience, min_delta, fit_target, max_seconds: evidence-based stopping
        of the distillation phase (``val_every`` was called ``check_every``). Every ``val_every``
        steps the student is scored on the labelled slices (fit, per-class Dice) and against the teacher's pseudo-labels on the real
        unlabelled slices (agreement). After ``min_steps``, the phase stops once every class fits
        to ``fit_target`` and the mean of fit and agreement has not improved by ``min_delta`` for
        ``patience`` checks, or at ``steps`` / ``max_seconds`` (wall clock). The best-scoring
        weights are kept.
    min_epochs: evidence may end the phase only after this many passes over the transfer set as
        well (``min_epochs * len(transfer) / batch_size`` steps, at most ``steps``), so a transfer set
        of several scans trains as long per slice as one scan does. Measured on CHAOS MR with the
        ``fast`` preset (benchmarks/RESULTS.md, section 6, ninth pass): a guard, not a gain on
        average. Three training scans once stopped after 29 passes (within the scans 0.889, new
        scans 0.828; run to ~50 passes: 0.911 / 0.867); over nine runs (three choices of scans,
        three seeds) new scans 0.816 -> 0.823 and within 0.907 -> 0.906, for 20-60 s more per run.
        Single scans (evidence stopped them after 61-81 passes) are unchanged. 0: off.
    feature_loss: ``"cosine"`` (1 - cosine similarity over channels) or ``"mse"``. ``w_feat`` is 0
        by default: the hint was neutral on CHAOS (kd-ablation-chaos.md) and cross-architecture
        hints rarely help (OFA-KD, Hao et al., NeurIPS 2023).
    labelled_fraction: share of each phase-1 batch drawn from labelled slices (the rest is drawn
        from the whole transfer set), so the few labels are seen every step. 0.5, as in
        semi-supervised practice (SSL4MIS mean teacher: 12 of 24).
    augment: batched random affine (+-15 deg, scale +-15 %, shift +-8 %) and gamma/noise.
    mr_augment: also a smooth multiplicative bias field and a random intensity window
        (:func:`augment_batch`), so that the student meets the intensity differences between MR
        scans. None (default): on when the scans are percentile-normalised (MR, ultrasound:
        :attr:`TransferSet.intensity`), off for CT windows (HU are calibrated; a bias field is an
        MR artefact). Measured on CHAOS MR, 3 training scans, seed 0 (benchmarks/RESULTS.md,
        section 6): other scans 0.610 -> 0.713, the training scans' unlabelled slices 0.893 ->
        0.898 (both after ``tskd segment``'s clean-up).
    standardize: train the student on intensity-standardised scans: each training scan's
        normalised intensities multiplied by the factor that brings its labelled classes to their
        geometric mean over the scans (:func:`TSKDLib.deploy.inference.training_intensity_factors`;
        the teacher and its cached outputs keep the scans as prepared), and the card's reference
        for ``tskd segment``'s standardisation of new scans is the standardised medians. None
        (default): on when two or more scans record class intensities (MR, ultrasound 3D scans;
        never CT windows), which leaves one-scan runs unchanged. Applied by the pipeline and the
        sparse-slice benchmark, not by :func:`distill` itself. Measured on CHAOS MR, 3 training
        scans, nine runs: new scans 0.854 -> 0.862, no organ below 0.70 in 8 runs of 9 (was 6)
        (benchmarks/RESULTS.md, section 6, fifteenth pass).
    checkpoint_every: steps between atomic checkpoints (when a checkpoint directory is given).
    log_every: steps between progress updates.
    seed: seed of the student initialisation, batches and augmentation.
    device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    threads: torch CPU threads while training (None: leave torch's setting; older configs call it
        ``num_threads``). On a CPU shared with other busy processes, 1 thread can be several
        times faster than 2 (no oversubscription).
    """

    method: str = "tskd"
    # optimisation (phase 1 = distillation; phase 2 = fine-tuning on the labels)
    finetune_steps: int = 150
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    weight_decay: float = 1e-4
    # losses (Liang et al. section 3.3; pseudo-labels and their filters: issue 15)
    w_sup: float = 1.0
    w_out: float = 1.0
    w_feat: float = 0.0
    output_loss: str = "pseudo"
    pseudo_threshold: float = 0.9
    consistency_3d: bool = True
    organ_ends: bool = True
    # the paper's soft targets and feature hint (used when output_loss / w_feat ask for them)
    temperature: float = 2.0
    feature_loss: str = "cosine"
    # batches
    labelled_fraction: float = 0.5
    augment: bool = True
    mr_augment: bool | None = None
    standardize: bool | None = None
    # evidence-based stopping of phase 1
    min_steps: int = 200
    min_epochs: float = 0.0
    min_delta: float = 0.005
    fit_target: float = 0.9
    max_seconds: float | None = None
    log_every: int = 5

    @classmethod
    def preset(cls, name: str, **overrides) -> "DistillConfig":
        """The distillation settings of a preset (:data:`TSKDLib.pipeline.presets.PRESETS`: ``fast``,
        ``balanced`` (alias ``default``), ``quality`` (alias ``full``)) with field overrides
        (older names such as ``num_threads`` are read too). Raises :class:`ConfigError`."""
        from TSKDLib.pipeline.presets import stage_preset

        values = {**stage_preset(name, "distillation"), **upgrade_names(overrides, "distillation")}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown distillation setting(s) {sorted(unknown)}.")
        return cls(**values).validated()

    def validated(self) -> "DistillConfig":
        """Check values; raises :class:`ConfigError`."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown distillation method {self.method!r}; choose one of {list(METHODS)}.")
        if self.steps < 0 or self.finetune_steps < 0 or self.steps + self.finetune_steps == 0:
            raise ConfigError("distillation needs a positive number of steps.")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1.")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0.")
        if self.output_loss not in ("pseudo", "kl", "bce"):
            raise ConfigError(f"output_loss must be 'pseudo', 'kl' or 'bce', not {self.output_loss!r}.")
        if not 0.0 <= self.pseudo_threshold < 1.0:
            raise ConfigError("pseudo_threshold must be within [0, 1).")
        if self.val_every < 1 or self.patience < 1:
            raise ConfigError("val_every and patience must be >= 1.")
        if self.min_epochs < 0:
            raise ConfigError("min_epochs must be >= 0.")
        if self.feature_loss not in ("cosine", "mse"):
            raise ConfigError(f"feature_loss must be 'cosine' or 'mse', not {self.feature_loss!r}.")
        if not 0.0 <= self.labelled_fraction <= 1.0:
            raise ConfigError("labelled_fraction must be within [0, 1].")
        return self

    @property
    def total_steps(self) -> int:
        return self.steps + self.finetune_steps

    def evidence_after(self, transfer_slices: int) -> int:
        """The first distillation step at which evidence may end the phase: ``min_steps``, or
        ``min_epochs`` passes over a transfer set of ``transfer_slices`` slices if that is longer;
        at most ``steps``."""
        passes = math.ceil(self.min_epochs * max(transfer_slices, 0) / self.batch_size)
        return min(self.steps, max(self.min_steps, passes))

    def effective_weights(self) -> tuple[float, float, float]:
        """``(w_sup, w_out, w_feat)`` after the method switches terms off."""
        if self.method == "scratch":
            return self.w_sup, 0.0, 0.0
        if self.method == "task_agnostic":  # feature distillation by definition (0.5 when w_feat is 0)
            return self.w_sup, 0.0, self.w_feat if self.w_feat > 0 else 0.5
        return self.w_sup, self.w_out, self.w_feat

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = str(d["device"])  # the pipeline may set a torch.device
        return d

    def fingerprint(self) -> dict:
        """Fields that must match for a checkpoint to be resumed (all but
        :data:`TSKDLib.engine.loop.RUNTIME_FIELDS`)."""
        return settings_identity(self.to_dict())


# ------------------------------------------------------------------------------------------------
# Transfer set and teacher-output cache
# ------------------------------------------------------------------------------------------------
@dataclass
class TransferSet:
    """Slices the student learns from (TS-KD Sec. 3.2-3.3).

    Attributes
    ----------
    images: ``(N, 1, S, S)`` float32 in [0, 1].
    labels: ``(N, S, S)`` int64 in ``0..K``; ``-1`` everywhere on unlabelled and synthetic slices.
    valid: ``(N, S, S)`` bool, False on padding.
    labelled: ``(N,)`` bool.
    synthetic: ``(N,)`` bool, True for diffusion-synthesised slices.
    num_classes: K.
    case_index, slice_index: ``(N,)`` int64, the scan and the slice (along the slice axis) of each
        real slice; ``-1`` for synthetic slices (or when unknown). Used to stack a scan's slices
        in order for the 3D consistency of the pseudo-labels.
    intensity: normalisation kind of the scans (``"window"`` CT, ``"percentile"`` MR/ultrasound,
        None unknown), from :attr:`TSKDLib.data.case.SliceSet.intensity`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    labelled: torch.Tensor
    synthetic: torch.Tensor
    num_classes: int
    case_index: torch.Tensor | None = None
    slice_index: torch.Tensor | None = None
    intensity: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @classmethod
    def build(cls, slices, synthetic_images: torch.Tensor | np.ndarray | None = None,
              include_unlabelled: bool = True) -> "TransferSet":
        """From a :class:`TSKDLib.data.case.SliceSet` (labelled and unlabelled slices) and optional
        synthetic slices ``(M, 1, S, S)`` (or ``(M, S, S)``) in [0, 1].

        Raises :class:`InputError` if the synthetic slices do not have the slice set's size."""
        keep = torch.ones(len(slices), dtype=torch.bool) if include_unlabelled else slices.labelled.clone()
        images = slices.images[keep].float()
        labels = slices.labels[keep]
        valid = slices.valid[keep]
        labelled = slices.labelled[keep]
        n_real = len(images)
        case_index = getattr(slices, "case_index", None)
        slice_index = getattr(slices, "slice_index", None)
        case_index = case_index[keep].clone() if case_index is not None else torch.full((n_real,), -1)
        slice_index = slice_index[keep].clone() if slice_index is not None else torch.full((n_real,), -1)
        synthetic = torch.zeros(len(images), dtype=torch.bool)
        if synthetic_images is not None and len(synthetic_images):
            syn = torch.as_tensor(np.asarray(synthetic_images) if not isinstance(synthetic_images, torch.Tensor)
                                  else synthetic_images).float()
            if syn.ndim == 3:
                syn = syn[:, None]
            s = images.shape[-1]
            if syn.ndim != 4 or syn.shape[1:] != (1, s, s):
                raise InputError(f"synthetic slices have shape {tuple(syn.shape)}, expected (M, 1, {s}, {s}).")
            m = syn.shape[0]
            images = torch.cat([images, syn.clamp(0, 1)])
            labels = torch.cat([labels, torch.full((m, s, s), -1, dtype=labels.dtype)])
            valid = torch.cat([valid, torch.ones(m, s, s, dtype=torch.bool)])
            labelled = torch.cat([labelled, torch.zeros(m, dtype=torch.bool)])
            synthetic = torch.cat([synthetic, torch.ones(m, dtype=torch.bool)])
            case_index = torch.cat([case_index, torch.full((m,), -1, dtype=case_index.dtype)])
            slice_index = torch.cat([slice_index, torch.full((m,), -1, dtype=slice_index.dtype)])
        return cls(images.contiguous(), labels.contiguous(), valid.contiguous(), labelled, synthetic,
                   slices.class_map.num_classes, case_index.long(), slice_index.long(),
                   getattr(slices, "intensity", None))

    def summary(self) -> dict:
        return {"slices": len(self), "labelled": int(self.labelled.sum()),
                "unlabelled": int((~self.labelled & ~self.synthetic).sum()),
                "synthetic": int(self.synthetic.sum()), "size": self.size}


@dataclass
class TeacherCache:
    """Teacher outputs on every transfer slice, computed once (see :func:`build_teacher_cache`).

    Attributes
    ----------
    probs: ``(N, K+1, S, S)`` float16 class probabilities (``class_probabilities`` of the teacher's
        logits), or None (task-agnostic teacher: no task probabilities).
    embedding: ``(N, 256, 64, 64)`` float16 image embeddings, or None.
    directory: where the ``.npy`` memmaps live, or None for an in-memory cache.
    """

    probs: np.ndarray | None
    embedding: np.ndarray | None
    directory: str | None = None

    def __len__(self) -> int:
        a = self.probs if self.probs is not None else self.embedding
        return 0 if a is None else int(a.shape[0])

    def take(self, index: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Float32 tensors ``(probs (b,K+1,S,S), embedding (b,256,64,64))`` for slice indices."""
        idx = np.asarray(index)
        order = np.argsort(idx, kind="stable")  # memmaps read faster in order
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))

        def get(a):
            if a is None:
                return None
            return torch.from_numpy(np.ascontiguousarray(a[idx[order]])[inv]).float()
        return get(self.probs), get(self.embedding)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "TeacherCache":
        """Open a cache written by :func:`build_teacher_cache`; raises :class:`CheckpointError`
        if it is incomplete."""
        d = Path(directory)
        meta_path = d / "cache.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError("teacher-output cache is missing or incomplete.", d,
                                  "Delete the folder; the cache is rebuilt.") from None
        mode = "r" if mmap else None
        probs = np.load(d / "probs.npy", mmap_mode=mode) if meta.get("probs") else None
        emb = np.load(d / "embedding.npy", mmap_mode=mode) if meta.get("embedding") else None
        return cls(probs, emb, str(d))


def _probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, S, S)`` mask logits -> ``(B, K+1, S, S)`` = softmax([0, l_1..l_K]) (design.md)."""
    logits = logits.float()
    return torch.softmax(torch.cat([torch.zeros_like(logits[:, :1]), logits], 1), 1)


def _split_teacher_output(out) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if isinstance(out, torch.Tensor):
        return None, out  # an embedding-only teacher (e.g. TaskAgnosticTeacher.embed)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        emb, probs = out
        return probs, emb
    emb = getattr(out, "embedding", None)
    logits = getattr(out, "logits", None)
    return (_probs_from_logits(logits) if logits is not None else None), emb


def build_teacher_cache(teacher: Callable, images: torch.Tensor, batch_size: int = 4,
                        directory: str | Path | None = None, with_probs: bool = True,
                        with_embedding: bool = True, progress: ProgressReporter | None = None,
                        dtype=np.float16) -> TeacherCache:
    """Run a teacher once over the transfer set and keep its outputs.

    Parameters
    ----------
    teacher:
        Callable on ``(b, 1, S, S)`` float32 slices in [0, 1] returning a
        :class:`TSKDLib.teacher.TeacherOutput` (``embedding (b,256,64,64)``, ``logits (b,K,S,S)``),
        a tuple ``(embedding, probs (b,K+1,S,S))``, or an embedding tensor alone. Run under
        ``torch.inference_mode`` on the teacher's device (``teacher.device`` if it has one).
    images:
        ``(N, 1, S, S)`` transfer-set slices.
    directory:
        If given, outputs go to ``probs.npy`` / ``embedding.npy`` memmaps there and ``cache.json``
        is written last; an existing complete cache with the same N is reused without running
        the teacher (resume). Else kept in memory.
    with_probs, with_embedding:
        Which outputs to keep (the task-agnostic baseline keeps only the embedding).
    progress:
        Reporter; one ``update`` per batch (no stage is opened here).

    Memory: ``2 * (K+1) * S^2`` bytes of probabilities and 2 MiB of embedding per slice (float16).

    Raises :class:`ConfigError` if the teacher does not return what is asked.
    """
    n = int(images.shape[0])
    d = Path(directory) if directory is not None else None
    if d is not None and (d / "cache.json").is_file():
        try:
            cache = TeacherCache.load(d)
            if len(cache) == n and (cache.probs is not None or not with_probs) and \
                    (cache.embedding is not None or not with_embedding):
                log.info("reusing teacher-output cache in %s", d)
                return cache
        except (CheckpointError, OSError, ValueError):
            pass
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "cache.json").unlink(missing_ok=True)
    device = getattr(teacher, "device", None)
    probs_arr = emb_arr = None

    def _store(arr, out, start, name, what):
        """Write one batch of teacher outputs into the (lazily created) array or memmap."""
        if out is None:
            raise ConfigError(f"the teacher returned no {what} but it was asked for.")
        out = out.float().cpu().numpy().astype(dtype)
        if arr is None:
            shape = (n, *out.shape[1:])
            arr = (np.lib.format.open_memmap(d / f"{name}.npy", "w+", dtype, shape) if d is not None
                   else np.empty(shape, dtype))
        arr[start:start + len(out)] = out
        return arr

    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = images[start:start + batch_size].float()
            if isinstance(device, torch.device):
                x = x.to(device)
            probs, emb = _split_teacher_output(teacher(x))
            if with_probs:
                probs_arr = _store(probs_arr, probs, start, "probs", "class probabilities/logits")
            if with_embedding:
                emb_arr = _store(emb_arr, emb, start, "embedding", "image embedding")
            if progress is not None:
                progress.update(min(start + batch_size, n), message="teacher outputs")
    if d is not None:
        for a in (probs_arr, emb_arr):
            if isinstance(a, np.memmap):
                a.flush()
        meta = {"n": n, "probs": probs_arr is not None, "embedding": emb_arr is not None}
        atomic_write(d / "cache.json", lambda tmp: tmp.write_text(json.dumps(meta)), overwrite=True)
        return TeacherCache.load(d)
    return TeacherCache(probs_arr, emb_arr, None)


# ------------------------------------------------------------------------------------------------
# Teacher pseudo-labels
# ------------------------------------------------------------------------------------------------
def teacher_pseudo_labels(probs: np.ndarray, transfer: TransferSet, threshold: float = 0.9,
                          consistency_3d: bool = True, batch: int = 16,
                          organ_ends: bool = True) -> tuple[torch.Tensor, dict]:
    """Hard targets from the teacher's cached probabilities, for the ``pseudo`` output loss.

    Parameters
    ----------
    probs:
        ``(N, K+1, S, S)`` teacher class probabilities (:class:`TeacherCache` ``probs``), aligned
        with ``transfer``.
    transfer:
        The transfer set; its labelled slices keep their own labels (the user's word wins).
    threshold:
        Pixels whose top teacher probability is below it become ``-1`` (ignored), as in FixMatch
        (Sohn et al., NeurIPS 2020).
    consistency_3d:
        Per scan (``transfer.case_index``) and class, stack the teacher's argmax over the scan's
        slices in slice order and label 3D connected components (6-connectivity, SciPy); keep the
        components that touch that class on the user's labelled slices (or, where the user
        labelled none of the class in this scan, the largest one); the other components become
        background. Rationale: the fine-tuned teacher paints confident organs on organ-free
        slices it never saw (``../shared/notes/kd-ablation-chaos.md``), while an organ is one
        object through neighbouring slices. With ``organ_ends``, beyond the outermost labelled
        slices of a class, what widens again after the organ narrowed to its tip becomes
        background too (:func:`beyond_organ_ends`). Synthetic slices are left as they are.

    Returns
    -------
    ``(targets, info)``: ``targets`` ``(N, S, S)`` int16 in ``-1..K`` (``-1`` = ignore; padding is
    ``-1``); ``info`` counts the pixels removed by the 3D filter and ignored by the threshold, and
    ``objects`` gives per class the largest number, over the scans where the class is labelled,
    of 3D objects (6-connected components of the user's labels joined with the teacher's argmax
    of the class) that hold the user's labels (0: never labelled). A class whose labels form one
    object in every scan is one object (liver, a kidney): see :func:`single_object_classes`.
    (Joined with the labels, the specks of the teacher's argmax on a labelled slice do not count
    as objects of their own.)
    """
    n = len(transfer)
    k = transfer.num_classes
    targets = torch.empty((n, transfer.size, transfer.size), dtype=torch.int16)
    for start in range(0, n, batch):
        p = torch.from_numpy(np.asarray(probs[start:start + batch], dtype=np.float32))
        conf, arg = p.max(1)
        t = arg.to(torch.int16)
        t[conf < threshold] = -1
        targets[start:start + batch] = t
    ignored = int((targets < 0).sum())
    removed = {name: 0 for name in range(1, k + 1)}
    objects = {name: 0 for name in range(1, k + 1)}
    if consistency_3d and transfer.case_index is not None:
        cases = sorted({int(c) for c in transfer.case_index.tolist() if c >= 0})
        for c in cases:
            rows = torch.nonzero(transfer.case_index == c).flatten()
            rows = rows[torch.argsort(transfer.slice_index[rows])]
            arg = np.stack([np.asarray(probs[int(r)], dtype=np.float32).argmax(0) for r in rows])
            lab = transfer.labels[rows].numpy()
            for cls in range(1, k + 1):
                drop, n_objects = _outside_the_labelled_object(arg == cls, lab == cls, organ_ends)
                objects[cls] = max(objects[cls], n_objects)
                if drop is not None and drop.any():
                    removed[cls] += int(drop.sum())
                    for j, r in enumerate(rows.tolist()):
                        if drop[j].any() and not bool(transfer.labelled[r]):
                            t = targets[r]
                            t[torch.from_numpy(drop[j])] = 0
    lab_rows = transfer.labelled
    targets[lab_rows] = transfer.labels[lab_rows].to(torch.int16)
    targets[~transfer.valid] = -1
    return targets, {"ignored_pixels": ignored, "removed_by_3d_filter": removed, "objects": objects}


def _outside_the_labelled_object(mask: np.ndarray, drawn: np.ndarray,
                                 organ_ends: bool = True) -> tuple[np.ndarray | None, int]:
    """One class on one scan's slices in order (``(Z, H, W)`` bool: the teacher's argmax ``mask``,
    the user's labels ``drawn``): the teacher's voxels to turn into background (None: none
    predicted), and the number of 3D objects holding the user's labels (0: none drawn).
    See :func:`teacher_pseudo_labels` (``consistency_3d``)."""
    from scipy import ndimage

    n_objects = 0
    if drawn.any():  # objects: the user's labels joined through the teacher's prediction
        joined = ndimage.label(mask | drawn)[0]
        n_objects = int(np.count_nonzero(np.unique(joined[drawn])))
    if not mask.any():
        return None, n_objects
    comp, _ = ndimage.label(mask)
    if drawn.any():
        keep_ids = [int(i) for i in np.unique(comp[drawn & mask]) if i > 0]
    else:  # no label of this class in this scan: its largest object
        keep_ids = [int(np.argmax(np.bincount(comp.ravel())[1:])) + 1]
    drop = mask & ~np.isin(comp, keep_ids)
    if organ_ends and drawn.any():
        drop |= beyond_organ_ends(mask & ~drop, drawn)
    return drop, n_objects


#: :func:`beyond_organ_ends`: the mask "widens again" when a slice's area exceeds this many times
#: the narrowest area so far plus ``ORGAN_END_SLACK`` of the largest labelled area (noise margin)
ORGAN_END_RATIO = 2.0
ORGAN_END_SLACK = 0.05


def beyond_organ_ends(mask: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """The part of a class's pseudo-label beyond an organ's end: ``(Z, H, W)`` bool to remove.

    ``mask``: ``(Z, H, W)`` bool, the teacher's prediction of one class on one scan's slices in
    slice order (after the 3D filter); ``drawn``: the same class on the user's labelled slices.
    Outward from the first and from the last slice holding the user's label, an organ narrows
    to its end. Walking outward, the narrowest area so far is tracked; once a slice's area exceeds
    ``ORGAN_END_RATIO`` x that area + ``ORGAN_END_SLACK`` x the largest labelled area, the
    prediction has widened again into something joined to the organ's tip (bowel below the
    liver, heart above it: CHAOS MR scan 31, benchmarks/RESULTS.md, section 6) and everything
    from the narrowest slice on is returned. The walk stops where the prediction ends (area 0).
    Slices between the first and last labelled slice are never touched."""
    out = np.zeros_like(mask)
    labelled = np.flatnonzero(drawn.any(axis=(1, 2)))
    if len(labelled) == 0:
        return out
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    slack = ORGAN_END_SLACK * float(drawn.sum(axis=(1, 2)).max())
    for start, step in ((int(labelled[0]), -1), (int(labelled[-1]), 1)):
        narrowest, at = float(drawn[start].sum()), start
        z = start + step
        while 0 <= z < len(area) and area[z] > 0:
            if area[z] < narrowest:
                narrowest, at = area[z], z
            elif area[z] > ORGAN_END_RATIO * narrowest + slack:
                part = slice(at + 1, None) if step > 0 else slice(0, at)
                out[part] = mask[part]
                break
            z += step
    return out


def single_object_classes(pseudo_info: dict | None) -> list[int]:
    """Classes (indices ``1..K``) that are one 3D object in the training scans: in every scan
    where the user labelled the class, its labels joined through the teacher's prediction form
    exactly one connected object (``objects == 1`` in :func:`teacher_pseudo_labels`' info). For
    these, ``tskd segment`` removes the components smaller than a fifth of the largest one (in the spirit
    of nnU-Net's post-processing, which keeps the largest component of classes where that helps
    on validation, Isensee et al., Nat Methods 2021); on CHAOS MR it removes the false organ
    fragments a model paints (benchmarks/RESULTS.md, section 6). Empty without pseudo-label info
    (e.g. a student trained from labels only)."""
    objects = (pseudo_info or {}).get("objects") or {}
    return sorted(int(c) for c, n in objects.items() if int(n) == 1)


# ------------------------------------------------------------------------------------------------
# Augmentation (joint, batched)
# ------------------------------------------------------------------------------------------------
def _random_affine(b: int, g: torch.Generator) -> torch.Tensor:
    """``(b, 2, 3)`` affine matrices in normalised coordinates (rotation, scale, shift)."""
    u = torch.rand(b, 4, generator=g)
    angle = (u[:, 0] * 2 - 1) * math.radians(15)
    scale = 1 + (u[:, 1] * 2 - 1) * 0.15
    shift = (u[:, 2:] * 2 - 1) * 0.16  # 8 % of the side = 0.16 in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return theta


def mr_intensity_augment(g: torch.Generator, images: torch.Tensor, bias_sd: float = 0.25,
                         window_low: float = 0.1, window_high: float = 0.25, p: float = 0.5) -> torch.Tensor:
    """Random MR intensity changes of a batch ``(b, 1, S, S)`` in ``[0, 1]`` (returned clamped).

    1. Bias field (with probability ``p`` per sample): the image is multiplied by ``exp(f)``, ``f``
       a 4 x 4 grid of N(0, ``bias_sd``) values upsampled bicubically to the slice: the smooth
       coil-sensitivity inhomogeneity of MR (as MONAI's ``RandBiasField``, Sudre et al. 2017,
       here batched and drawn from ``g`` so a step's batch depends on (seed, step) only).
    2. Intensity window (with probability ``p``): ``(x - lo) / (hi - lo)`` with ``lo`` uniform in
       ``+-window_low`` and ``hi`` in ``1 +- window_high``: the brightness and contrast
       differences that percentile normalisation leaves between scans.

    Source of the values: benchmarks/RESULTS.md, section 6 (CHAOS MR; stronger and milder
    settings measured)."""
    b = images.shape[0]
    coarse = torch.randn(b, 1, 4, 4, generator=g) * bias_sd
    field = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=True)
    on = (torch.rand(b, generator=g) < p).float()[:, None, None, None]
    images = images * torch.exp(on * field)
    lo = (torch.rand(b, generator=g) * 2 - 1) * window_low
    hi = 1 + (torch.rand(b, generator=g) * 2 - 1) * window_high
    on = torch.rand(b, generator=g) < p
    lo = torch.where(on, lo, torch.zeros(b))
    hi = torch.where(on, hi, torch.ones(b))
    return ((images - lo[:, None, None, None]) / (hi - lo)[:, None, None, None]).clamp(0, 1)


def augment_batch(g: torch.Generator, images, labels, valid, probs=None, emb=None, prob: float = 0.8,
                  targets=None, mr: bool = False):
    """Apply one random affine per sample jointly to all tensors, then gamma/noise to the image
    (and :func:`mr_intensity_augment` when ``mr``).

    Shapes: images ``(b,1,S,S)``, labels ``(b,S,S)`` (``-1`` rows untouched), valid ``(b,S,S)``,
    probs ``(b,K+1,S,S)``, emb ``(b,C,h,w)`` (any resolution: the transform acts in normalised
    coordinates), targets ``(b,S,S)`` pseudo-labels in ``-1..K`` (nearest; ``-1`` outside).
    Returns ``(images, labels, valid, probs, emb)``, plus the targets when given."""
    b = images.shape[0]
    theta = _random_affine(b, g)
    apply = torch.rand(b, generator=g) < prob
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(b, 2, 3)
    theta = torch.where(apply[:, None, None], theta, eye)

    def warp(x, mode, rows=None):
        th = theta if rows is None else theta[rows]
        grid = F.affine_grid(th, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)

    images = warp(images, "bilinear")
    lab = labels.clone()
    has = (labels >= 0).flatten(1).any(1)  # labelled rows; unlabelled rows are -1 everywhere
    if has.any():
        lab[has] = warp(labels[has].clamp(min=0)[:, None].float(), "nearest", has)[:, 0].round().long()
    valid = warp(valid[:, None].float(), "nearest")[:, 0] > 0.5
    if probs is not None:
        probs = warp(probs, "bilinear")
    if emb is not None:
        emb = warp(emb, "bilinear")
    if targets is not None:  # shift by one so that the zero padding becomes -1 (ignored)
        targets = warp(targets[:, None].float() + 1, "nearest")[:, 0].round().long() - 1
    # intensity: gamma (p=0.3, 0.7..1.5) and Gaussian noise (p=0.2, sd 0.02) on the image only
    gam = torch.where(torch.rand(b, generator=g) < 0.3, 0.7 + 0.8 * torch.rand(b, generator=g), torch.ones(b))
    images = images.clamp(0, 1).pow(gam[:, None, None, None])
    noisy = (torch.rand(b, generator=g) < 0.2).float()[:, None, None, None]
    images = (images + noisy * 0.02 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    if mr:
        images = mr_intensity_augment(g, images)
    if targets is not None:
        return images, lab, valid, probs, emb, targets
    return images, lab, valid, probs, emb


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def output_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, valid: torch.Tensor,
                   temperature: float = 2.0, kind: str = "kl") -> torch.Tensor:
    """Output distillation loss, averaged over valid pixels.

    ``kl``: ``tau^2 * sum_c p_T^tau log(p_T^tau / p_S^tau)`` with ``p^tau = softmax(log p / tau)``
    (Hinton et al. 2015). ``bce``: mean over classes of the binary cross-entropy between the
    student's softmax probabilities and the teacher's probabilities.

    Shapes: student_logits ``(B, K+1, S, S)``, teacher_probs ``(B, K+1, S, S)``, valid ``(B, S, S)``.
    """
    m = valid.float()
    denom = m.sum().clamp(min=1.0)
    log_pt = torch.log(teacher_probs.clamp(min=1e-6))
    if kind == "kl":
        t = temperature
        log_pt_t = torch.log_softmax(log_pt / t, 1)
        log_ps_t = torch.log_softmax(student_logits / t, 1)
        kl = (log_pt_t.exp() * (log_pt_t - log_ps_t)).sum(1)
        return (kl * m).sum() / denom * (t * t)
    ps = torch.softmax(student_logits, 1).clamp(1e-6, 1 - 1e-6)
    pt = teacher_probs.clamp(0, 1)
    bce = -(pt * torch.log(ps) + (1 - pt) * torch.log(1 - ps)).mean(1)
    return (bce * m).sum() / denom


def feature_kd_loss(projected: torch.Tensor, teacher_embedding: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Feature hint loss (FitNets, Romero et al. 2015) between the projected student bottleneck
    ``(B, 256, h, w)`` and the teacher embedding ``(B, 256, H, W)`` average-pooled to ``(h, w)``.

    ``cosine``: mean over positions of ``1 - cos`` over channels; ``mse``: mean squared error."""
    t = teacher_embedding
    if t.shape[-2:] != projected.shape[-2:]:
        t = F.adaptive_avg_pool2d(t, projected.shape[-2:])
    if kind == "cosine":
        return (1 - F.cosine_similarity(projected, t, dim=1, eps=1e-6)).mean()
    return F.mse_loss(projected, t)


class FeatureProjector(nn.Module):
    """Learned 1x1 convolution from the student bottleneck ``C_b`` to the teacher's 256 channels."""

    def __init__(self, in_channels: int, out_channels: int = TEACHER_EMBED_DIM):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.proj(x)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    """Outcome of :func:`distill`.

    Attributes
    ----------
    model: the trained student (eval mode, CPU).
    history: per-log-step dicts (``step``, ``phase``, losses, ``lr``).
    metrics: final summary (``loss``, ``val_dice`` when validation was given, ``seconds``, ``steps``).
    config: the effective :class:`DistillConfig`.
    transfer: :meth:`TransferSet.summary`.
    """

    model: StudentNet
    history: list[dict]
    metrics: dict
    config: DistillConfig
    transfer: dict = field(default_factory=dict)

    def training_summary(self) -> dict:
        """The model card's ``training`` entry."""
        return {"method": self.config.method, "config": self.config.to_dict(), "transfer_set": self.transfer,
                "metrics": self.metrics}


def _lr_at(step: int, cfg: DistillConfig, phase_end: int | None = None, planned: int | None = None) -> float:
    """Learning rate of ``step``: warm-up + cosine over the planned distillation steps
    (``cfg.steps``, or fewer when a time budget plans fewer; evidence may end the phase earlier, at
    ``phase_end``), then cosine over ``finetune_steps`` (:func:`TSKDLib.engine.loop.warmup_cosine`)."""
    phase_end = cfg.steps if phase_end is None else phase_end
    planned = cfg.steps if planned is None else planned
    if step < phase_end:
        return cfg.lr * warmup_cosine(step, cfg.warmup_steps, planned)
    return cfg.finetune_lr * warmup_cosine(step - phase_end, 0, cfg.finetune_steps)


def _sample(step: int, cfg: DistillConfig, transfer: TransferSet, g: torch.Generator, use_kd: bool,
            phase_end: int | None = None) -> np.ndarray:
    lab_idx = torch.nonzero(transfer.labelled).flatten()
    b = cfg.batch_size
    if step >= (cfg.steps if phase_end is None else phase_end) or not use_kd:
        if len(lab_idx) == 0:
            raise InputError("no labelled slice in the transfer set.", fix="Label at least one slice.")
        return lab_idx[torch.randint(len(lab_idx), (b,), generator=g)].numpy()
    n_lab = int(round(b * cfg.labelled_fraction)) if len(lab_idx) else 0
    parts = []
    if n_lab:
        parts.append(lab_idx[torch.randint(len(lab_idx), (n_lab,), generator=g)])
    parts.append(torch.randint(len(transfer), (b - n_lab,), generator=g))
    return torch.cat(parts).numpy()


#: distillation steps timed before a time budget (``max_seconds``) plans the phase's length
_CALIBRATION_STEPS = 20


@dataclass
class _StopState:
    """Evidence-based stopping of the distillation phase (see :class:`DistillConfig`): the
    phase's planned and actual end, the best check so far (:class:`TSKDLib.engine.loop.Plateau`, a
    gain must exceed ``min_delta``) and its weights. Saved in the checkpoint."""

    phase_end: int
    planned: int = 0
    best_score: float = -1.0
    best_step: int = 0
    bad_checks: int = 0
    elapsed: float = 0.0
    reason: str | None = None
    best_state: dict | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("phase_end", "planned", "best_score", "best_step", "bad_checks", "elapsed",
                                               "reason", "best_state")}

    def observe(self, rec: dict, model: nn.Module, cfg: DistillConfig, step: int, elapsed: float,
                evidence_after: int) -> bool:
        """Record a check; True when the phase should end now (by evidence only from step
        ``evidence_after``: :meth:`DistillConfig.evidence_after`)."""
        plateau = Plateau(cfg.min_delta, strict=True, best=self.best_score, best_step=self.best_step,
                          bad=self.bad_checks)
        if plateau.observe(rec["score"], step):  # a small gain still moves the kept weights
            self.best_state = trainable_state(model)
        self.best_score, self.best_step, self.bad_checks = plateau.best, plateau.best_step, plateau.bad
        if cfg.max_seconds is not None and elapsed >= 1.2 * cfg.max_seconds:  # the plan was too hopeful
            self.reason = "time budget"
            return True
        if step >= evidence_after and rec["fit_min"] >= cfg.fit_target and plateau.stalled(cfg.patience):
            self.reason = "converged"
            return True
        return False


class _Monitor:
    """Scores the student during distillation: fit on the labelled slices (per-class Dice against
    the user's labels) and agreement with the teacher's pseudo-labels on the real unlabelled
    slices (per-class Dice; pixels the pseudo-labels ignore are left out)."""

    def __init__(self, transfer: TransferSet, pseudo: torch.Tensor | None, max_slices: int = 32):
        self.k = transfer.num_classes
        lab = torch.nonzero(transfer.labelled).flatten()
        self.lab_images, self.lab_labels = transfer.images[lab], transfer.labels[lab]
        self.unl_images = self.unl_targets = None
        if pseudo is not None:
            unl = torch.nonzero(~transfer.labelled & ~transfer.synthetic).flatten()
            if len(unl) > max_slices:  # evenly spread subset: a check stays cheap on long scans
                unl = unl[torch.linspace(0, len(unl) - 1, max_slices).round().long()]
            if len(unl):
                self.unl_images, self.unl_targets = transfer.images[unl], pseudo[unl].long()

    def check(self, model: nn.Module, step: int) -> dict:
        rec: dict = {"step": step}
        fit = dice_scores(predict_labels(model, self.lab_images), self.lab_labels, self.k)
        rec["fit"] = fit["per_class"]
        finite = [v for v in fit["per_class"] if not math.isnan(v)]
        rec["fit_mean"] = fit["mean"]
        rec["fit_min"] = min(finite) if finite else 1.0
        if self.unl_images is not None:
            pred = predict_labels(model, self.unl_images)
            ign = self.unl_targets < 0
            pred = pred.clone()
            pred[ign] = 0
            agr = dice_scores(pred, self.unl_targets.clamp(min=0), self.k)
            rec["agreement"] = agr["per_class"]
            rec["agreement_mean"] = agr["mean"]
            rec["score"] = 0.5 * (rec["fit_mean"] + (agr["mean"] if not math.isnan(agr["mean"]) else rec["fit_mean"]))
        else:
            rec["agreement_mean"] = float("nan")
            rec["score"] = rec["fit_mean"]
        return rec


class _StudentStep(nn.Module):
    """The student's training forward as one module, so that DDP can wrap it.

    ``forward(images (B,1,S,S), project)`` -> ``(logits (B,K+1,S,S), projected (B,256,S/16,S/16)
    or None)``: ``model.forward_features`` and, when ``project``, the feature projector on the
    bottleneck. Same operations as calling them directly.
    """

    def __init__(self, model: StudentNet, projector: FeatureProjector | None):
        super().__init__()
        self.model, self.projector = model, projector

    def forward(self, images: torch.Tensor, project: bool = False):
        logits, feat = self.model.forward_features(images)
        return logits, (self.projector(feat) if project and self.projector is not None else None)


#: added (times the rank) to the per-step seed on ranks > 0; rank 0 keeps the single-device seed
_RANK_SEED_STRIDE = 7_919_000_003


def distill(transfer: TransferSet, config: DistillConfig | None = None, cache: TeacherCache | None = None,
            student: StudentConfig | StudentNet | str | None = None, checkpoint_dir: str | Path | None = None,
            progress: ProgressReporter | None = None, validation=None, open_stage: bool = True) -> DistillResult:
    """Train a student on the transfer set: distillation phase, then supervised fine-tune.

    Parameters
    ----------
    transfer:
        The :class:`TransferSet` (images ``(N,1,S,S)``; labels ``-1`` on unlabelled slices).
    config:
        :class:`DistillConfig`; ``method`` selects TS-KD or a baseline.
    cache:
        :class:`TeacherCache` aligned with ``transfer`` (same N and order). ``tskd`` needs
        ``probs`` (when ``w_out > 0``) and ``embedding`` (when ``w_feat > 0``); ``task_agnostic``
        needs ``embedding``; ``scratch`` needs nothing.
    student:
        Architecture name, :class:`StudentConfig` or a built :class:`StudentNet` (K is taken from
        the transfer set when building).
    checkpoint_dir:
        Folder for ``checkpoint.pt`` (atomic, every ``checkpoint_every`` steps), the final
        ``student.pt`` and ``result.json``. An existing checkpoint there is resumed.
    progress:
        Reporter; the ``distillation`` stage is opened and closed here when ``open_stage``.
    validation:
        Optional ``(images (M,1,S,S), labels (M,S,S))`` or a ``SliceSet``; Dice is computed at
        the end of each phase and reported as ``val_dice``.

    Multi-GPU (``torchrun``, see :mod:`TSKDLib.engine.distributed`): every rank runs this function on
    the same transfer set and cache; the student (and feature projector) train inside
    :class:`~torch.nn.parallel.DistributedDataParallel`, which all-reduces the gradients in
    ``backward`` (https://pytorch.org/docs/stable/notes/ddp.html). Every rank draws its own
    ``batch_size`` slices and augmentations per step (rank 0 exactly those of a single-device
    run, rank r from a seed offset by r), so the effective batch is ``world_size * batch_size``.
    Only rank 0 writes ``checkpoint.pt``, ``student.pt``, ``result.json`` and progress; all ranks
    resume from the same checkpoint. Without torchrun nothing changes.

    Returns :class:`DistillResult`.

    Raises
    ------
    ConfigError
        Invalid config, or a cache that lacks what the method needs or does not match the
        transfer set.
    CheckpointError
        A checkpoint in ``checkpoint_dir`` written with other settings or another transfer set
        (the message names what changed), or an unreadable one.

    The loop is :class:`TSKDLib.engine.loop.Trainer` (AdamW; the learning rate of each step from
    :func:`_lr_at`, which follows the plan as it changes); hooks: the time plan (after 20 timed
    steps), the evidence check (:class:`_Monitor`, :class:`_StopState`), logging and the atomic
    checkpoint (:class:`TSKDLib.engine.loop.ResumeFile`).
    """
    cfg = (config or DistillConfig()).validated()
    _check_inputs(cfg, transfer, cache)
    with cpu_threads(cfg.threads):
        run = _Distillation(transfer, cfg, cache, student, checkpoint_dir, progress)
        return run.run(validation, open_stage)


def _check_inputs(cfg: DistillConfig, transfer: TransferSet, cache: TeacherCache | None) -> None:
    """Raise :class:`ConfigError` / :class:`InputError` when the cache or labels cannot serve ``cfg``."""
    w_sup, w_out, w_feat = cfg.effective_weights()
    if cfg.method != "scratch":
        if cache is None:
            raise ConfigError(f"method {cfg.method!r} needs a teacher-output cache (build_teacher_cache).")
        if len(cache) != len(transfer):
            raise ConfigError(f"teacher cache has {len(cache)} slices, the transfer set {len(transfer)}.")
        if w_out > 0 and cache.probs is None:
            raise ConfigError("output distillation needs teacher probabilities in the cache.")
        if w_feat > 0 and cache.embedding is None:
            raise ConfigError("feature distillation needs teacher embeddings in the cache.")
        if cache.probs is not None and cache.probs.shape[1] != transfer.num_classes + 1:
            raise ConfigError(f"teacher probabilities have {cache.probs.shape[1]} channels, expected "
                              f"{transfer.num_classes + 1} (K+1).")
    if not bool(transfer.labelled.any()) and (w_sup > 0 and cfg.finetune_steps > 0 or cfg.method == "scratch"):
        raise InputError("no labelled slice in the transfer set.", fix="Label at least one slice.")


class _Distillation:
    """State of one :func:`distill` call: student, losses, pseudo-labels, stop state, engine."""

    def __init__(self, transfer: TransferSet, cfg: DistillConfig, cache, student, checkpoint_dir, progress):
        distributed.init(cfg.device)  # no-op without torchrun or when already initialised
        self.rank, self.main = distributed.rank(), distributed.is_main()
        self.device = distributed.device_for(resolve_device(cfg.device))
        self.progress = progress if (progress is not None and self.main) else NullProgress()
        self.transfer, self.cfg, self.cache = transfer, cfg, cache
        #: from this step evidence may end the phase (fixed by the settings and the transfer set's
        #: size, both part of the checkpoint's identity, so not saved in it)
        self.evidence_after = cfg.evidence_after(len(transfer))
        self.w_sup, self.w_out, self.w_feat = cfg.effective_weights()
        from monai.losses import DiceCELoss, MaskedDiceLoss

        torch.manual_seed(cfg.seed)
        self.model = student if isinstance(student, StudentNet) else \
            build_student(student, num_classes=transfer.num_classes, input_size=transfer.size)
        emb_dim = cache.embedding.shape[1] if cache is not None and cache.embedding is not None else TEACHER_EMBED_DIM
        self.projector = FeatureProjector(self.model.bottleneck_channels, emb_dim)
        self.model.to(self.device)
        self.projector.to(self.device)
        params = list(self.model.parameters()) + (list(self.projector.parameters()) if self.w_feat > 0 else [])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sup_loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        self.pseudo, self.pseudo_info = None, {}
        if cfg.method == "tskd" and self.w_out > 0 and cfg.output_loss == "pseudo":
            self.pseudo, self.pseudo_info = teacher_pseudo_labels(cache.probs, transfer, cfg.pseudo_threshold,
                                                                  cfg.consistency_3d, organ_ends=cfg.organ_ends)
        self.pseudo_dice = MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        #: the MR intensity augmentation, resolved from the scans' normalisation when not set
        self.mr_augment = bool(cfg.mr_augment if cfg.mr_augment is not None else transfer.intensity == "percentile")
        self.monitor = _Monitor(transfer, self.pseudo) if cfg.steps > 0 else None
        self.ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if self.ckdir is not None and self.main:
            self.ckdir.mkdir(parents=True, exist_ok=True)
        identity = {"settings": cfg.fingerprint(), "data": {"transfer_slices": len(transfer)}}
        self.resume = ResumeFile(self.ckdir / "checkpoint.pt" if self.ckdir is not None else None,
                                 "distillation", identity)

    def _restore(self) -> int:
        """Resume from the checkpoint if there is one; returns the step to start from."""
        cfg = self.cfg
        self.history: list[dict] = []
        self.stop = _StopState(phase_end=cfg.steps, planned=cfg.steps)
        state = self.resume.load()
        start = 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.projector.load_state_dict(state["projector"])
            self.opt.load_state_dict(state["optimizer"])
            start, self.history = int(state["step"]), list(state["history"])
            self.stop = _StopState(**state["stop"])
            log.info("resuming distillation at step %d", start)
        self.resume.check_ranks_agree(start)
        return start

    def _payload(self, step: int) -> dict:
        return {"step": step, "model": self.model.state_dict(), "projector": self.projector.state_dict(),
                "optimizer": self.opt.state_dict(), "history": self.history,
                "stop": {**self.stop.to_dict(), "elapsed": self.stop.elapsed + time.monotonic() - self.t0}}

    # -- one step -------------------------------------------------------------------------------
    def _batch(self, step: int):
        """This rank's batch of ``step``: images, labels, valid, teacher probs/embedding, pseudo-labels."""
        cfg, transfer, stop = self.cfg, self.transfer, self.stop
        self.phase = "distill" if step < stop.phase_end else "finetune"
        use_kd = self.phase == "distill" and (self.w_out > 0 or self.w_feat > 0)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + self.rank * _RANK_SEED_STRIDE)
        idx = _sample(step, cfg, transfer, g, use_kd, stop.phase_end)
        images, labels, valid = transfer.images[idx], transfer.labels[idx], transfer.valid[idx]
        probs = emb = None
        targets = self.pseudo[idx].long() if (use_kd and self.pseudo is not None) else None
        if use_kd and (cfg.output_loss != "pseudo" and self.w_out > 0 or self.w_feat > 0):
            probs, emb = self.cache.take(idx)
            probs = probs if (self.w_out > 0 and cfg.output_loss != "pseudo") else None
            emb = emb if self.w_feat > 0 else None
        if cfg.augment:
            out_aug = augment_batch(g, images, labels, valid, probs, emb, targets=targets, mr=self.mr_augment)
            images, labels, valid, probs, emb = out_aug[:5]
            if targets is not None:
                targets = out_aug[5]
        if targets is not None:
            targets = targets.to(self.device)
        return images.to(self.device), labels.to(self.device), valid.to(self.device), probs, emb, targets

    def _train_step(self, step: int) -> torch.Tensor:
        """The loss of ``step``: supervised Dice + CE on labelled samples, output and feature KD."""
        cfg, device = self.cfg, self.device
        images, labels, valid, probs, emb, targets = self._batch(step)
        logits, projected = self.trainer.net(images, project=emb is not None)
        loss = logits.new_zeros(())
        parts = {}
        lab = (labels >= 0).flatten(1).any(1)  # labelled samples only reach the supervised loss
        if self.w_sup > 0 and bool(lab.any()):
            sup = self.sup_loss_fn(logits[lab], labels[lab][:, None])
            loss = loss + self.w_sup * sup
            parts["sup"] = float(sup.detach())
        if targets is not None and bool((~lab).any()):
            t = targets[~lab]
            known = (t >= 0)[:, None].float()
            pl = self.pseudo_dice(logits[~lab], t.clamp(min=0)[:, None], mask=known) + \
                F.cross_entropy(logits[~lab], t, ignore_index=-1) if bool(known.any()) else None
            if pl is not None:
                loss = loss + self.w_out * pl
                parts["kd_out"] = float(pl.detach())
        if probs is not None:
            out = output_kd_loss(logits, probs.to(device), valid, cfg.temperature, cfg.output_loss)
            loss = loss + self.w_out * out
            parts["kd_out"] = float(out.detach())
        if emb is not None:
            fl = feature_kd_loss(projected, emb.to(device), cfg.feature_loss)
            loss = loss + self.w_feat * fl
            parts["kd_feat"] = float(fl.detach())
        self.parts, self.loss = parts, loss
        return loss

    # -- hooks (after each step, in this order) ---------------------------------------------------
    def _record(self, step: int) -> None:
        """Accumulate the step's losses (the loss of the global batch: the mean over the ranks)."""
        self.parts["loss"] = float(Trainer.global_mean(self.loss))
        for k, v in self.parts.items():
            self.running[k] = self.running.get(k, 0.0) + v
        self.running["_n"] = self.running.get("_n", 0) + 1

    def _plan(self, step: int) -> None:
        """After 20 timed steps, plan the phase to fit ``max_seconds`` (so the LR anneals within it)."""
        cfg, stop = self.cfg, self.stop
        if not (self.phase == "distill" and cfg.max_seconds is not None and stop.planned == cfg.steps
                and step - self.start == _CALIBRATION_STEPS):
            return
        per_step = (time.monotonic() - self.t0) / _CALIBRATION_STEPS * 1.1  # + checks and logging
        left = max(cfg.max_seconds - stop.elapsed - (time.monotonic() - self.t0), 0.0)
        plan = int(min(cfg.steps, max(cfg.min_steps, step + left / per_step)))
        stop.planned = int(distributed.broadcast(plan))
        stop.phase_end = min(stop.phase_end, stop.planned)
        self.trainer.end = stop.phase_end + cfg.finetune_steps
        if stop.planned < cfg.steps:
            self.progress.log(f"distillation: {stop.planned} of {cfg.steps} steps fit the {cfg.max_seconds:.0f} s "
                              f"budget ({per_step:.2f} s per step); a GPU or --preset balanced trains longer.")

    def _check(self, step: int) -> None:
        """Every ``val_every`` distillation steps: fit and agreement; evidence may end the phase."""
        cfg, stop = self.cfg, self.stop
        self.rec = None
        if not (self.phase == "distill" and self.monitor is not None
                and (step % cfg.val_every == 0 or step == stop.phase_end)):
            return
        self.rec = self.monitor.check(self.model, step)
        self.model.train()
        if stop.observe(self.rec, self.model, cfg, step, stop.elapsed + time.monotonic() - self.t0,
                        self.evidence_after):
            stop.phase_end = step  # evidence says stop: fine-tune from the best weights next
        stop.phase_end = int(distributed.broadcast(stop.phase_end))
        self.trainer.end = stop.phase_end + cfg.finetune_steps
        if step == stop.phase_end and stop.best_state is not None:
            self.model.load_state_dict(stop.best_state)

    def _last_of_phase(self, step: int) -> bool:
        return step in (self.stop.phase_end, self.stop.phase_end + self.cfg.finetune_steps)

    def _log(self, step: int) -> None:
        """Every ``log_every`` steps, at a check and at the end of each phase: a history entry."""
        last = self._last_of_phase(step)
        if not (step % self.cfg.log_every == 0 or last or self.rec is not None):
            return
        n = self.running.pop("_n", 1)
        entry = {"step": step, "phase": self.phase, "lr": _lr_at(step - 1, self.cfg, self.stop.phase_end,
                                                                   self.stop.planned),
                 **{k: v / n for k, v in self.running.items()}}
        if self.rec is not None:
            entry.update({"fit": self.rec["fit_mean"], "agreement": self.rec["agreement_mean"]})
        self.running = {}
        if last and self.val is not None:
            entry["val_dice"] = evaluate_dice(self.model, *self.val)["mean"]
            self.model.train()
        self.history.append(entry)
        self.progress.update(step, {k: v for k, v in entry.items() if k not in ("step",)})

    # -- the run --------------------------------------------------------------------------------
    def run(self, validation, open_stage: bool) -> DistillResult:
        cfg, stop = self.cfg, None
        self.start = start = self._restore()
        stop = self.stop
        # DDP wrapper of the trainable forward. With feature distillation some parameters get no
        # gradient in some steps (the projector in fine-tuning steps; the output head in a
        # feature-only step without labelled slice), hence find_unused_parameters.
        feat = self.w_feat > 0
        self.trainer = Trainer(_StudentStep(self.model, self.projector if feat else None), self.opt, self.device,
                               lambda step: _lr_at(step, cfg, stop.phase_end, stop.planned),
                               stop.phase_end + cfg.finetune_steps, mixed_precision=False,
                               ddp={"find_unused_parameters": feat})
        self.val = _validation_tensors(validation)
        if open_stage:
            self.progress.stage_start("distillation", cfg.total_steps,
                                      message=f"{cfg.method}: {self.transfer.summary()}")
        if start == 0 and self.evidence_after > cfg.min_steps:
            self.progress.log(f"distillation: evidence may end it after step {self.evidence_after} ({cfg.min_epochs:g} "
                              f"passes over {len(self.transfer)} transfer slices).")
        self.t0 = time.monotonic()
        self.model.train()
        self.running: dict[str, float] = {}
        self.rec = None
        save = checkpoint_hook(self.resume, cfg.checkpoint_every, self._payload, self.trainer,
                               also=self._last_of_phase)
        step = self.trainer.fit(start, self._train_step, [self._record, self._plan, self._check, self._log, save])
        return self._finish(step, open_stage)

    def _finish(self, step: int, open_stage: bool) -> DistillResult:
        """Final metrics, ``student.pt`` and ``result.json`` (rank 0), stage end."""
        cfg, stop, model = self.cfg, self.stop, self.model
        model.eval()
        model.cpu()
        if stop.reason is None:
            stop.reason = ("steps" if stop.phase_end >= cfg.steps else
                           "time budget" if stop.phase_end >= stop.planned else "evidence")
        metrics = {"steps": step, "distill_steps": stop.phase_end, "planned_steps": stop.planned,
                   "evidence_after": self.evidence_after,
                   "seconds": round(time.monotonic() - self.t0, 2), "stopped_by": stop.reason,
                   "mr_augment": self.mr_augment and cfg.augment}
        if self.pseudo_info:
            metrics["pseudo_labels"] = self.pseudo_info
        if self.history:
            metrics["loss"] = self.history[-1].get("loss")
        if self.val is not None:
            metrics["val_dice"] = evaluate_dice(model, *self.val)
        if self.monitor is not None and cfg.method != "scratch":
            metrics["final_check"] = self.monitor.check(model, step)
        if self.ckdir is not None and self.main:
            save_student(model, self.ckdir / "student.pt")
            text = json.dumps({"metrics": metrics, "history": self.history}, indent=1, default=str)
            atomic_write(self.ckdir / "result.json", lambda tmp: tmp.write_text(text), overwrite=True)
        if open_stage:
            self.progress.stage_end({k: v for k, v in metrics.items()
                                     if k in ("steps", "distill_steps", "seconds", "stopped_by")})
        return DistillResult(model, self.history, metrics, cfg, self.transfer.summary())


def _validation_tensors(validation):
    if validation is None:
        return None
    if hasattr(validation, "images") and hasattr(validation, "labels"):
        keep = validation.labelled
        return validation.images[keep], validation.labels[keep]
    images, labels = validation
    return torch.as_tensor(images), torch.as_tensor(labels)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_labels(model: nn.Module, images: torch.Tensor, batch_size: int = 8,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Argmax labelmaps ``(N, S, S)`` int64 (on the CPU) of ``(N, 1, S, S)`` slices (any device).
    ``device``: where the slices go, None = the model's own device (so a model moved to the CPU
    after CUDA training is scored where it is)."""
    was = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(images[i:i + batch_size].float().to(device)).argmax(1).cpu())
    model.train(was)
    return torch.cat(out)


def evaluate_dice(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, per_slice: bool = False,
                  device: torch.device | str | None = None, num_classes: int | None = None) -> dict:
    """Dice of a model's argmax on ``(N,1,S,S)`` images against ``(N,S,S)`` labels (see
    :func:`dice_scores`), computed on ``device`` (None: the model's). K defaults to the model's
    output channels - 1."""
    pred = predict_labels(model, images, device=device)
    k = num_classes if num_classes is not None else int(getattr(getattr(model, "config", None), "num_classes", 0) or
                                                         int(labels.max()))
    return dice_scores(pred, labels, k, per_slice)


#: thresholds of :func:`quality_gate` (issue 15: "any class with training fit < 0.8"; agreement with
#: the teacher below its own validation Dice minus 0.05)
GATE_MIN_FIT = 0.8
GATE_AGREEMENT_MARGIN = 0.05


def quality_gate(names: Sequence[str], fit: Sequence[float], agreement: Sequence[float] | None = None,
                 teacher_val: Sequence[float] | None = None) -> dict:
    """Check that a distilled student learnt what it was taught, before it is handed over.

    Parameters
    ----------
    names:
        The K class names.
    fit:
        The student's Dice per class on the user's labelled slices (NaN: class not labelled).
    agreement:
        The student's Dice per class against its teacher's pseudo-labels on the real unlabelled
        slices (NaN: the teacher predicts none of it), or None (scratch student).
    teacher_val:
        The teacher's validation Dice per class (held-out labelled slices), or None.

    Returns ``{"passed": bool, "warnings": [str], "fit": {...}, "agreement": {...}}``: a warning for
    each class with ``fit < 0.8``, and for each class whose agreement with the teacher is below
    ``max(0.8, teacher validation Dice) - 0.05`` (the student does not reproduce its teacher).
    """
    warnings_: list[str] = []
    fit_d = {n: (None if math.isnan(v) else round(float(v), 4)) for n, v in zip(names, fit)}
    for n, v in fit_d.items():
        if v is not None and v < GATE_MIN_FIT:
            warnings_.append(f"the student fits the labelled slices of '{n}' poorly (Dice {v:.2f} < "
                             f"{GATE_MIN_FIT}): check those labels, label more slices, or train longer "
                             "(--preset balanced).")
    agr_d = {}
    if agreement is not None:
        tv = list(teacher_val) if teacher_val is not None else [None] * len(names)
        for n, v, t in zip(names, agreement, tv):
            if v is None or math.isnan(v):
                agr_d[n] = None
                continue
            agr_d[n] = round(float(v), 4)
            bar = max(GATE_MIN_FIT, float(t) if t is not None and not math.isnan(float(t)) else 0.0) \
                - GATE_AGREEMENT_MARGIN
            if v < bar:
                warnings_.append(f"the student reproduces its teacher poorly on '{n}' (agreement Dice {v:.2f} "
                                 f"< {bar:.2f} on the unlabelled slices): the exported model is worse than "
                                 "the fine-tuned teacher for this class; label more slices or train longer.")
    return {"passed": not warnings_, "warnings": warnings_, "fit": fit_d, "agreement": agr_d}


def method_config(method: str, base: DistillConfig | None = None, **overrides) -> DistillConfig:
    """The config of one of :data:`METHODS` at the same budget as ``base``."""
    base = base or DistillConfig()
    return replace(base, method=method, **overrides).validated()
