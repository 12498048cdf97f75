"""Teacher networks: the task-specific (LoRA + learned prompts) and task-agnostic teachers.

Interface shared by both (``docs/design.md``, "Tensors between stages"):

* input: ``images (B, 1, S, S)`` float32 in [0, 1], padding 0 (S = 256 by default; the backbone
  resizes internally to its encoder size, e.g. 1024 for SAM);
* output: :class:`TeacherOutput` with ``embedding (B, 256, 64, 64)`` and ``logits (B, K, S, S)``;
* :func:`class_probabilities` maps logits to ``(B, K+1, S, S)`` probabilities with a fixed
  background logit 0; :func:`labelmap` is their argmax ``(B, S, S)`` int64 in ``0..K``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from TSKDLib.errors import ConfigError, LabelError
from TSKDLib.teacher.backbones import EMBED_DIM, FoundationModel
from TSKDLib.teacher.lora import LoraSettings, inject_lora


@dataclass
class TeacherOutput:
    """What a teacher returns for a batch of slices.

    Attributes
    ----------
    embedding:
        ``(B, 256, 64, 64)`` float32 image-encoder features (the teacher representation the
        student distils from; for LiteMedSAM a 64 x 64 grid over the 256 x 256 input).
    logits:
        ``(B, K, S, S)`` float32 per-class mask logits, one channel per foreground class
        1..K, at the input slice size S. Not mutually exclusive; see :func:`class_probabilities`.
    """

    embedding: torch.Tensor
    logits: torch.Tensor

    def probabilities(self) -> torch.Tensor:
        """``(B, K+1, S, S)`` class probabilities (see :func:`class_probabilities`)."""
        return class_probabilities(self.logits)

    def labelmap(self) -> torch.Tensor:
        """``(B, S, S)`` int64 labelmap in ``0..K`` (see :func:`labelmap`)."""
        return labelmap(self.logits)


def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, ...)`` mask logits -> ``(B, K+1, ...)`` with a zero background logit in front."""
    return torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Resolve per-class mask logits into mutually exclusive class probabilities.

    ``p = softmax([0, l_1, ..., l_K])`` over the class axis (dim 1): background has the fixed
    logit 0, so for K = 1 ``p_1 = sigmoid(l_1)`` (SAM's own mask probability) and overlapping
    masks compete by their logits (design contract, ``docs/design.md``).

    Parameters
    ----------
    logits:
        ``(B, K, H, W)`` (or any ``(B, K, ...)``) float mask logits.

    Returns
    -------
    ``(B, K+1, H, W)`` float probabilities summing to 1 over dim 1; channel 0 is background.
    """
    return torch.softmax(class_logits(logits.float()), dim=1)


def labelmap(logits: torch.Tensor) -> torch.Tensor:
    """Argmax of :func:`class_probabilities`: ``(B, K, H, W)`` logits -> ``(B, H, W)`` int64 in 0..K.

    Computed without the softmax: class k wins where its logit is the largest and positive.
    """
    best, index = logits.max(dim=1)
    return torch.where(best > 0, index + 1, torch.zeros_like(index))


def autocast_for(device: torch.device):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op on CPU.

    On the CPU, float32 is kept: bfloat16 matmuls are slower than float32 on CPUs without AMX.
    """
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def as_image_batch(images) -> torch.Tensor:
    """Accept ``(B, 1, S, S)`` / ``(1, S, S)`` / ``(S, S)`` tensors or arrays; return ``(B, 1, S, S)`` float32."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None] if x.shape[0] == 1 else x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, S, S), got {tuple(x.shape)}")
    return x.float()


class BaseTeacher(nn.Module):
    """Common inference helpers; subclasses implement :meth:`forward`.

    Attributes
    ----------
    backbone:
        The :class:`~TSKDLib.teacher.backbones.FoundationModel`.
    """

    backbone: FoundationModel

    @property
    def device(self) -> torch.device:
        return self.backbone.pixel_mean.device

    def _resize_logits(self, low_res: torch.Tensor, size: int) -> torch.Tensor:
        """Low-res decoder logits ``(B, K, 256, 256)`` -> ``(B, K, S, S)`` (bilinear, as SAM)."""
        if low_res.shape[-1] != size:
            low_res = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
        return low_res

    @torch.inference_mode()
    def predict_proba(self, images, batch_size: int = 8) -> torch.Tensor:
        """Class probabilities ``(B, K+1, S, S)`` float32 on the CPU for ``(B, 1, S, S)`` slices."""
        return torch.cat([out.probabilities() for out in self.iter_predict(images, batch_size)])

    @torch.inference_mode()
    def predict_labelmap(self, images, batch_size: int = 8) -> torch.Tensor:
        """Labelmap ``(B, S, S)`` int64 in 0..K on the CPU for ``(B, 1, S, S)`` slices."""
        return torch.cat([out.labelmap() for out in self.iter_predict(images, batch_size)])

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 8) -> TeacherOutput:
        """Batched inference over many slices; the whole :class:`TeacherOutput` on the CPU.

        Memory: 4 MiB of embedding per slice plus ``K * S * S * 4`` bytes of logits.
        """
        outs = list(self.iter_predict(images, batch_size))
        return TeacherOutput(torch.cat([o.embedding for o in outs]), torch.cat([o.logits for o in outs]))

    @torch.inference_mode()
    def iter_predict(self, images, batch_size: int = 8) -> Iterator[TeacherOutput]:
        """Yield :class:`TeacherOutput` (float32, CPU) per batch of ``batch_size`` slices.

        ``images``: ``(N, 1, S, S)`` tensor/array in [0, 1], or an iterable of such batches.
        Runs in eval mode under ``torch.inference_mode`` and CUDA autocast when on the GPU.
        """
        was_training = self.training
        self.eval()
        try:
            if isinstance(images, (torch.Tensor, np.ndarray)):
                x = as_image_batch(images)
                batches = (x[i:i + batch_size] for i in range(0, x.shape[0], batch_size))
            else:
                batches = (as_image_batch(b) for b in images)
            for batch in batches:
                with autocast_for(self.device):
                    out = self(batch.to(self.device, non_blocking=True))
                yield TeacherOutput(out.embedding.float().cpu(), out.logits.float().cpu())
        finally:
            self.train(was_training)


class TaskAgnosticTeacher(BaseTeacher):
    """The pre-trained foundation model, not adapted: the TS-KD paper's task-agnostic baseline.

    Segments with box prompts exactly as MedSAM/LiteMedSAM inference does (single-mask output);
    by default one full-image box, i.e. "segment the salient structure".

    Parameters
    ----------
    backbone:
        A frozen :class:`FoundationModel` (``load_foundation_model``).
    """

    def __init__(self, backbone: FoundationModel):
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.eval()

    @property
    def num_classes(self) -> int:
        return 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, 256, 64, 64)`` of ``(B, 1, S, S)`` slices in [0, 1]."""
        return self.backbone.encode(images)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> TeacherOutput:
        """Box-prompted masks.

        Parameters
        ----------
        images:
            ``(B, 1, S, S)`` float32 in [0, 1].
        boxes:
            Optional ``(B, K, 4)`` or ``(K, 4)`` boxes ``(x0, y0, x1, y1)`` in slice pixels
            (0..S-1); default the full-image box ``[0, 0, S-1, S-1]`` (K = 1).

        Returns
        -------
        TeacherOutput with ``logits (B, K, S, S)`` (one channel per box).
        """
        b, size = images.shape[0], images.shape[-1]
        emb = self.backbone.encode(images)
        scale = self.backbone.image_size / size
        if boxes is None:
            tokens = self.backbone.box_tokens(self.backbone.full_box(images.device))  # (1, 2, 256)
        else:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=images.device)
            if boxes.ndim == 2:
                boxes = boxes.unsqueeze(0).expand(b, -1, -1)
            k = boxes.shape[1]
            scaled = (boxes + 0.5) * scale - 0.5  # pixel-centre consistent rescale to encoder pixels
            tokens = self.backbone.box_tokens(scaled.reshape(b * k, 4)).view(b, k, 2, EMBED_DIM)
        low = self.backbone.decode(emb, tokens)
        return TeacherOutput(emb, self._resize_logits(low, size))


class TaskSpecificTeacher(BaseTeacher):
    """Prompt-free multi-class teacher: foundation model + LoRA + one learned prompt per class.

    One shared encoder pass per slice; the decoder runs once per (slice, class) with that class's
    learned sparse prompt tokens, batched (``FoundationModel.decode``). Prompt tokens are
    initialised from the prompt encoder's full-image-box embedding, so before training every
    class predicts what the task-agnostic model predicts for the full box. Everything but the
    LoRA weights and the prompt tokens is frozen.

    Parameters
    ----------
    backbone:
        A freshly loaded :class:`FoundationModel` (it is modified in place: adapters injected).
    class_names:
        Names of the foreground classes 1..K (index 0 is background and is not listed).
    lora:
        :class:`~TSKDLib.teacher.lora.LoraSettings` (rank, alpha, dropout, target groups).
    seed:
        Seed of the LoRA ``A`` initialisation (the torch RNG is restored afterwards).

    Raises
    ------
    LabelError
        Empty, duplicate or blank class names.
    ConfigError
        Invalid LoRA settings.
    """

    def __init__(self, backbone: FoundationModel, class_names: Sequence[str],
                 lora: LoraSettings | None = None, seed: int = 0):
        super().__init__()
        names = [str(n) for n in class_names]
        if not names:
            raise LabelError("the teacher needs at least one foreground class and the class map has none.",
                             fix="give a class map with at least one label value other than background 0.")
        if len(set(names)) != len(names) or any(not n.strip() for n in names):
            raise LabelError(f"class names must be unique and non-empty, got {names}.",
                             fix="rename the classes in the class map.")
        if any(name.startswith("lora_") for name, _ in backbone.named_parameters()):
            raise ConfigError("this foundation model already carries LoRA adapters.",
                              fix="load a fresh model with load_foundation_model() for each teacher.")
        self.class_names = names
        self.lora_settings = lora or LoraSettings()
        self.backbone = backbone
        backbone.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapted_modules = inject_lora(backbone, self.lora_settings)
        with torch.no_grad():
            box = backbone.box_tokens(backbone.full_box()).detach().clone()  # (1, 2, 256)
        self.prompt_tokens = nn.Parameter(box.repeat(len(names), 1, 1))  # (K, 2, 256)
        self.validation: dict = {}

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.class_names)

    @property
    def adapts_encoder(self) -> bool:
        """True if the image encoder carries LoRA (its embeddings cannot be cached in training)."""
        return self.lora_settings.adapts_encoder

    def train(self, mode: bool = True):
        """Train mode for the adapters only: frozen modules (BatchNorm, dropout) stay in eval mode."""
        super().train(mode)
        if mode:
            self.backbone.eval()
            for name, module in self.backbone.named_modules():
                if name.endswith((".lora_dropout", ".lora_dropout.default")):
                    module.train(True)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, 256, 64, 64)`` (with encoder LoRA if configured)."""
        return self.backbone.encode(images)

    def decode(self, embedding: torch.Tensor, size: int) -> torch.Tensor:
        """Per-class logits ``(B, K, size, size)`` from embeddings ``(B, 256, 64, 64)``."""
        low = self.backbone.decode(embedding, self.prompt_tokens.to(embedding.dtype))
        return self._resize_logits(low, size)

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """``(B, 1, S, S)`` slices in [0, 1] -> :class:`TeacherOutput` (``logits (B, K, S, S)``)."""
        emb = self.embed(images)
        return TeacherOutput(emb, self.decode(emb, images.shape[-1]))

    # -- trained state -------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: ``prompt_tokens`` and every ``lora_`` tensor (CPU copies)."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters()
                if name == "prompt_tokens" or "lora_" in name}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors from :meth:`trainable_state_dict`; keys and shapes must match exactly.

        Raises
        ------
        ValueError
            On missing, unexpected or wrong-shape keys.
        """
        own = dict(self.named_parameters())
        expected = {n for n in own if n == "prompt_tokens" or "lora_" in n}
        missing, unexpected = expected - set(state), set(state) - expected
        wrong = [n for n in expected & set(state) if tuple(state[n].shape) != tuple(own[n].shape)]
        if missing or unexpected or wrong:
            raise ValueError(f"teacher weights do not match: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}, wrong shape {wrong[:3]}")
        with torch.no_grad():
            for name in expected:
                own[name].copy_(state[name])
