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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import CheckpointError, ConfigError, InputError
from .io import atomic_write
from .metrics import dice_scores
from .progress import NullProgress, ProgressReporter
from .runtime import resolve_device
from .student import StudentConfig, StudentNet, build_student, save_student

log = logging.getLogger(__name__)

METHODS = ("scratch", "task_agnostic", "tskd")
TEACHER_EMBED_DIM = 256
TEACHER_EMBED_SIZE = 64


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class DistillConfig:
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
    check_every, min_steps, patience, min_delta, fit_target, max_seconds: evidence-based stopping
        of the distillation phase. Every ``check_every`` steps the student is scored on the
        labelled slices (fit, per-class Dice) and against the teacher's pseudo-labels on the real
        unlabelled slices (agreement). After ``min_steps``, the phase stops once every class fits
        to ``fit_target`` and the mean of fit and agreement has not improved by ``min_delta`` for
        ``patience`` checks, or at ``steps`` / ``max_seconds`` (wall clock). The best-scoring
        weights are kept.
    feature_loss: ``"cosine"`` (1 - cosine similarity over channels) or ``"mse"``. ``w_feat`` is 0
        by default: the hint was neutral on CHAOS (kd-ablation-chaos.md) and cross-architecture
        hints rarely help (OFA-KD, Hao et al., NeurIPS 2023).
    labelled_fraction: share of each phase-1 batch drawn from labelled slices (the rest is drawn
        from the whole transfer set), so the few labels are seen every step. 0.5, as in
        semi-supervised practice (SSL4MIS mean teacher: 12 of 24).
    augment: batched random affine (+-15 deg, scale +-15 %, shift +-8 %) and gamma/noise.
    checkpoint_every: steps between atomic checkpoints (when a checkpoint directory is given).
    log_every: steps between progress updates.
    seed: seed of the student initialisation, batches and augmentation.
    device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    num_threads: torch CPU threads (None: leave torch's setting). On a CPU shared with other
        busy processes, 1 thread can be several times faster than 2 (no oversubscription).
    """

    method: str = "tskd"
    steps: int = 600
    finetune_steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    w_sup: float = 1.0
    w_out: float = 1.0
    w_feat: float = 0.0
    temperature: float = 2.0
    output_loss: str = "pseudo"
    feature_loss: str = "cosine"
    labelled_fraction: float = 0.5
    pseudo_threshold: float = 0.9
    consistency_3d: bool = True
    check_every: int = 50
    min_steps: int = 200
    patience: int = 3
    min_delta: float = 0.005
    fit_target: float = 0.9
    max_seconds: float | None = None
    augment: bool = True
    checkpoint_every: int = 50
    log_every: int = 5
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None

    #: presets sized for a 2-core CPU at S = 256 with the default student
    PRESETS = {
        # CPU: on CHAOS MR the student reached its teacher's pseudo-labels after 550-650 steps on
        # scan 32 but only after ~900 on scan 34, where a 700-step schedule left it at fit 0.69
        # (benchmarks/RESULTS.md, section 6): up to 1400 steps (~4 min on a quiet 2-core CPU),
        # stopped when fit and agreement stop improving after 600, and planned shorter (with a
        # gate warning if it then falls short) when a slow CPU would need more than 10 minutes
        "fast": dict(steps=1400, finetune_steps=40, batch_size=4, min_steps=600, max_seconds=600.0),
        "default": dict(steps=3000, finetune_steps=150),
        "full": dict(steps=8000, finetune_steps=400, batch_size=8, patience=5),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "DistillConfig":
        """A named preset (``fast``, ``default``, ``full``) with field overrides."""
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown distillation preset {name!r}; choose one of {sorted(cls.PRESETS)}.")
        return cls(**{**cls.PRESETS[name], **overrides}).validated()

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
        if self.check_every < 1 or self.patience < 1:
            raise ConfigError("check_every and patience must be >= 1.")
        if self.feature_loss not in ("cosine", "mse"):
            raise ConfigError(f"feature_loss must be 'cosine' or 'mse', not {self.feature_loss!r}.")
        if not 0.0 <= self.labelled_fraction <= 1.0:
            raise ConfigError("labelled_fraction must be within [0, 1].")
        return self

    @property
    def total_steps(self) -> int:
        return self.steps + self.finetune_steps

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
        """Fields that must match for a checkpoint to be resumed."""
        d = self.to_dict()
        for k in ("checkpoint_every", "log_every", "device", "num_threads", "max_seconds"):
            d.pop(k)
        return d


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
    """

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    labelled: torch.Tensor
    synthetic: torch.Tensor
    num_classes: int
    case_index: torch.Tensor | None = None
    slice_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @classmethod
    def build(cls, slices, synthetic_images: torch.Tensor | np.ndarray | None = None,
              include_unlabelled: bool = True) -> "TransferSet":
        """From a :class:`TSKDLib.case.SliceSet` (labelled and unlabelled slices) and optional
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
                   slices.class_map.num_classes, case_index.long(), slice_index.long())

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
                          consistency_3d: bool = True, batch: int = 16) -> tuple[torch.Tensor, dict]:
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
        object through neighbouring slices. Synthetic slices are left as they are.

    Returns
    -------
    ``(targets, info)``: ``targets`` ``(N, S, S)`` int16 in ``-1..K`` (``-1`` = ignore; padding is
    ``-1``); ``info`` counts the pixels removed by the 3D filter and ignored by the threshold.
    """
    from scipy import ndimage

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
    if consistency_3d and transfer.case_index is not None:
        cases = sorted({int(c) for c in transfer.case_index.tolist() if c >= 0})
        for c in cases:
            rows = torch.nonzero(transfer.case_index == c).flatten()
            rows = rows[torch.argsort(transfer.slice_index[rows])]
            arg = np.stack([np.asarray(probs[int(r)], dtype=np.float32).argmax(0) for r in rows])
            lab = transfer.labels[rows].numpy()
            for cls in range(1, k + 1):
                mask = arg == cls
                if not mask.any():
                    continue
                comp, m = ndimage.label(mask)
                drawn = lab == cls
                if drawn.any():
                    keep_ids = [int(i) for i in np.unique(comp[drawn & mask]) if i > 0]
                else:  # no label of this class in this scan: its largest object
                    keep_ids = [int(np.argmax(np.bincount(comp.ravel())[1:])) + 1]
                drop = mask & ~np.isin(comp, keep_ids)
                if drop.any():
                    removed[cls] += int(drop.sum())
                    for j, r in enumerate(rows.tolist()):
                        if drop[j].any() and not bool(transfer.labelled[r]):
                            t = targets[r]
                            t[torch.from_numpy(drop[j])] = 0
    lab_rows = transfer.labelled
    targets[lab_rows] = transfer.labels[lab_rows].to(torch.int16)
    targets[~transfer.valid] = -1
    return targets, {"ignored_pixels": ignored, "removed_by_3d_filter": removed}


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


def augment_batch(g: torch.Generator, images, labels, valid, probs=None, emb=None, prob: float = 0.8,
                  targets=None):
    """Apply one random affine per sample jointly to all tensors, then gamma/noise to the image.

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
    ``phase_end``), then cosine over ``finetune_steps``."""
    phase_end = cfg.steps if phase_end is None else phase_end
    planned = cfg.steps if planned is None else planned
    if step < phase_end:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        span = max(planned - cfg.warmup_steps, 1)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))
    k = step - phase_end
    return cfg.finetune_lr * 0.5 * (1 + math.cos(math.pi * k / max(cfg.finetune_steps, 1)))


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
    """Evidence-based stopping of the distillation phase (see :class:`DistillConfig`)."""

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

    def observe(self, rec: dict, model: nn.Module, cfg: DistillConfig, step: int, elapsed: float) -> bool:
        """Record a check; True when the phase should end now."""
        score = rec["score"]
        if score > self.best_score + cfg.min_delta:
            self.best_score, self.best_step, self.bad_checks = score, step, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_checks += 1
            if score > self.best_score:  # a small gain still moves the kept weights
                self.best_score, self.best_step = score, step
                self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if cfg.max_seconds is not None and elapsed >= 1.2 * cfg.max_seconds:  # the plan was too hopeful
            self.reason = "time budget"
            return True
        if step >= cfg.min_steps and rec["fit_min"] >= cfg.fit_target and self.bad_checks >= cfg.patience:
            self.reason = "converged"
            return True
        return False


class _Monitor:
    """Scores the student during distillation: fit on the labelled slices (per-class Dice against
    the user's labels) and agreement with the teacher's pseudo-labels on the real unlabelled
    slices (per-class Dice; pixels the pseudo-labels ignore are left out)."""

    def __init__(self, transfer: TransferSet, pseudo: torch.Tensor | None, device, max_slices: int = 32):
        self.k = transfer.num_classes
        self.device = device
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
        fit = dice_scores(predict_labels(model, self.lab_images, device=self.device), self.lab_labels, self.k)
        rec["fit"] = fit["per_class"]
        finite = [v for v in fit["per_class"] if not math.isnan(v)]
        rec["fit_mean"] = fit["mean"]
        rec["fit_min"] = min(finite) if finite else 1.0
        if self.unl_images is not None:
            pred = predict_labels(model, self.unl_images, device=self.device)
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

    Multi-GPU (``torchrun``, see :mod:`TSKDLib.distributed`): every rank runs this function on
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
        A checkpoint in ``checkpoint_dir`` written with a different configuration.
    """
    cfg = (config or DistillConfig()).validated()
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
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    distributed.init(cfg.device)  # no-op without torchrun or when already initialised
    n_ranks, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    device = distributed.device_for(resolve_device(cfg.device))
    progress = progress or NullProgress()
    if not main:
        progress = NullProgress()  # only rank 0 reports

    from monai.losses import DiceCELoss, MaskedDiceLoss

    torch.manual_seed(cfg.seed)
    if isinstance(student, StudentNet):
        model = student
    else:
        model = build_student(student, num_classes=transfer.num_classes, input_size=transfer.size)
    projector = FeatureProjector(model.bottleneck_channels,
                                 cache.embedding.shape[1] if cache is not None and cache.embedding is not None
                                 else TEACHER_EMBED_DIM)
    model.to(device)
    projector.to(device)
    params = list(model.parameters()) + (list(projector.parameters()) if w_feat > 0 else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sup_loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    pseudo = None
    pseudo_info: dict = {}
    if cfg.method == "tskd" and w_out > 0 and cfg.output_loss == "pseudo":
        pseudo, pseudo_info = teacher_pseudo_labels(cache.probs, transfer, cfg.pseudo_threshold, cfg.consistency_3d)
    pseudo_dice = MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    monitor = _Monitor(transfer, pseudo, device) if cfg.steps > 0 else None

    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, history = 0, []
    stop = _StopState(phase_end=cfg.steps, planned=cfg.steps)
    if ckdir is not None:
        if main:
            ckdir.mkdir(parents=True, exist_ok=True)
        ck = ckdir / "checkpoint.pt"
        if ck.is_file():
            try:
                state = torch.load(ck, map_location="cpu", weights_only=False)
            except Exception as exc:  # truncated file
                raise CheckpointError(f"distillation checkpoint is unreadable ({exc}).", ck,
                                      "Delete it to restart the stage.") from None
            if state.get("fingerprint") != cfg.fingerprint() or state.get("n") != len(transfer):
                raise CheckpointError("distillation checkpoint was written with another configuration or "
                                      "transfer set.", ck, "Use a new run directory or delete the checkpoint.")
            model.load_state_dict(state["model"])
            projector.load_state_dict(state["projector"])
            opt.load_state_dict(state["optimizer"])
            start, history = int(state["step"]), list(state["history"])
            stop = _StopState(**state.get("stop", {"phase_end": cfg.steps, "planned": cfg.steps}))
            log.info("resuming distillation at step %d", start)

    if not distributed.all_equal(start):
        raise CheckpointError("the ranks disagree on the distillation checkpoint's step.", ckdir,
                              "Run every rank on the same run directory (a shared file system).")
    # DDP wrapper of the trainable forward (the module itself on one process). With feature
    # distillation some parameters get no gradient in some steps (the projector in fine-tuning
    # steps; the output head in a feature-only step without labelled slice), hence
    # find_unused_parameters; without it every parameter is used in every step.
    net = distributed.wrap_ddp(_StudentStep(model, projector if w_feat > 0 else None), device,
                               find_unused_parameters=w_feat > 0)

    def save_checkpoint(step: int) -> None:
        if ckdir is None or not main:
            return
        payload = {"step": step, "model": model.state_dict(), "projector": projector.state_dict(),
                   "optimizer": opt.state_dict(), "history": history, "fingerprint": cfg.fingerprint(),
                   "n": len(transfer), "stop": {**stop.to_dict(), "elapsed": stop.elapsed + time.monotonic() - t0}}
        atomic_write(ckdir / "checkpoint.pt", lambda tmp: torch.save(payload, tmp), overwrite=True)

    val = _validation_tensors(validation)
    metrics: dict = {}
    if open_stage:
        progress.stage_start("distillation", cfg.total_steps,
                             message=f"{cfg.method}: {transfer.summary()}")
    t0 = time.monotonic()
    model.train()
    running: dict[str, float] = {}
    step = start
    while step < stop.phase_end + cfg.finetune_steps:
        phase = "distill" if step < stop.phase_end else "finetune"
        use_kd = phase == "distill" and (w_out > 0 or w_feat > 0)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + rank * _RANK_SEED_STRIDE)
        idx = _sample(step, cfg, transfer, g, use_kd, stop.phase_end)
        images = transfer.images[idx]
        labels = transfer.labels[idx]
        valid = transfer.valid[idx]
        probs = emb = None
        targets = pseudo[idx].long() if (use_kd and pseudo is not None) else None
        if use_kd and (cfg.output_loss != "pseudo" and w_out > 0 or w_feat > 0):
            probs, emb = cache.take(idx)
            probs = probs if (w_out > 0 and cfg.output_loss != "pseudo") else None
            emb = emb if w_feat > 0 else None
        if cfg.augment:
            out_aug = augment_batch(g, images, labels, valid, probs, emb, targets=targets)
            images, labels, valid, probs, emb = out_aug[:5]
            if targets is not None:
                targets = out_aug[5]
        images, labels, valid = images.to(device), labels.to(device), valid.to(device)
        for lr_group in opt.param_groups:
            lr_group["lr"] = _lr_at(step, cfg, stop.phase_end, stop.planned)
        logits, projected = net(images, project=emb is not None)
        loss = logits.new_zeros(())
        parts = {}
        lab = (labels >= 0).flatten(1).any(1)  # labelled samples only reach the supervised loss
        if w_sup > 0 and bool(lab.any()):
            sup = sup_loss_fn(logits[lab], labels[lab][:, None])
            loss = loss + w_sup * sup
            parts["sup"] = float(sup.detach())
        if targets is not None and bool((~lab).any()):
            t = targets[~lab].to(device)
            known = (t >= 0)[:, None].float()
            pl = pseudo_dice(logits[~lab], t.clamp(min=0)[:, None], mask=known) + \
                F.cross_entropy(logits[~lab], t, ignore_index=-1) if bool(known.any()) else None
            if pl is not None:
                loss = loss + w_out * pl
                parts["kd_out"] = float(pl.detach())
        if probs is not None:
            out = output_kd_loss(logits, probs.to(device), valid, cfg.temperature, cfg.output_loss)
            loss = loss + w_out * out
            parts["kd_out"] = float(out.detach())
        if emb is not None:
            fl = feature_kd_loss(projected, emb.to(device), cfg.feature_loss)
            loss = loss + w_feat * fl
            parts["kd_feat"] = float(fl.detach())
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            opt.step()
        if n_ranks > 1:  # report the global batch: mean of the ranks' losses (parts may differ per rank)
            parts["loss"] = float(distributed.mean(loss.detach().float()))
        else:
            parts["loss"] = float(loss.detach())
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + v
        running["_n"] = running.get("_n", 0) + 1
        step += 1
        done = step
        rec = None
        if (phase == "distill" and cfg.max_seconds is not None and stop.planned == cfg.steps
                and done - start == _CALIBRATION_STEPS):
            # plan the phase to fit the time budget, so that the learning rate anneals within it
            per_step = (time.monotonic() - t0) / _CALIBRATION_STEPS * 1.1  # + checks and logging
            left = max(cfg.max_seconds - stop.elapsed - (time.monotonic() - t0), 0.0)
            plan = int(min(cfg.steps, max(cfg.min_steps, done + left / per_step)))
            stop.planned = int(distributed.broadcast(plan))
            stop.phase_end = min(stop.phase_end, stop.planned)
            if stop.planned < cfg.steps:
                progress.log(f"distillation: {stop.planned} of {cfg.steps} steps fit the {cfg.max_seconds:.0f} s "
                             f"budget ({per_step:.2f} s per step); a GPU or --preset balanced trains longer.")
        if phase == "distill" and monitor is not None and (done % cfg.check_every == 0 or done == stop.phase_end):
            rec = monitor.check(model, done)
            model.train()
            elapsed = stop.elapsed + time.monotonic() - t0
            if stop.observe(rec, model, cfg, done, elapsed):
                stop.phase_end = done  # evidence says stop: fine-tune from the best weights next
            stop.phase_end = int(distributed.broadcast(stop.phase_end))
            if done == stop.phase_end and stop.best_state is not None:
                model.load_state_dict(stop.best_state)
        last_of_phase = done == stop.phase_end or done == stop.phase_end + cfg.finetune_steps
        if done % cfg.log_every == 0 or last_of_phase or rec is not None:
            n = running.pop("_n", 1)
            entry = {"step": done, "phase": phase, "lr": _lr_at(step - 1, cfg, stop.phase_end, stop.planned),
                     **{k: v / n for k, v in running.items()}}
            if rec is not None:
                entry.update({"fit": rec["fit_mean"], "agreement": rec["agreement_mean"]})
            running = {}
            if last_of_phase and val is not None:
                entry["val_dice"] = evaluate_dice(model, *val, device=device)["mean"]
                model.train()
            history.append(entry)
            progress.update(done, {k: v for k, v in entry.items() if k not in ("step",)})
        if done % cfg.checkpoint_every == 0 or last_of_phase:
            save_checkpoint(done)
    model.eval()
    model.cpu()
    if stop.reason is None:
        stop.reason = ("steps" if stop.phase_end >= cfg.steps else
                       "time budget" if stop.phase_end >= stop.planned else "evidence")
    metrics = {"steps": step, "distill_steps": stop.phase_end, "planned_steps": stop.planned,
               "seconds": round(time.monotonic() - t0, 2), "stopped_by": stop.reason}
    if pseudo_info:
        metrics["pseudo_labels"] = pseudo_info
    if history:
        metrics["loss"] = history[-1].get("loss")
    if val is not None:
        metrics["val_dice"] = evaluate_dice(model, *val)
    if monitor is not None and cfg.method != "scratch":
        metrics["final_check"] = monitor.check(model, step)
    if ckdir is not None and main:
        save_student(model, ckdir / "student.pt")
        text = json.dumps({"metrics": metrics, "history": history}, indent=1, default=str)
        atomic_write(ckdir / "result.json", lambda tmp: tmp.write_text(text), overwrite=True)
    if open_stage:
        progress.stage_end({k: v for k, v in metrics.items() if k in ("steps", "distill_steps", "seconds", "stopped_by")})
    return DistillResult(model, history, metrics, cfg, transfer.summary())


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
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Argmax labelmaps ``(N, S, S)`` int64 of ``(N, 1, S, S)`` slices."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(images[i:i + batch_size].float().to(device)).argmax(1).cpu())
    model.train(was)
    return torch.cat(out)


def evaluate_dice(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, per_slice: bool = False,
                  device: torch.device | str = "cpu", num_classes: int | None = None) -> dict:
    """Dice of a model's argmax on ``(N,1,S,S)`` images against ``(N,S,S)`` labels (see
    :func:`dice_scores`). K defaults to the model's output channels - 1."""
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
