"""Student networks: the small 2D segmentation models distilled from the teacher (TS-KD stage 3).

TS-KD (Liang et al., arXiv 2503.06976, Sec. 3.3) distils a foundation-model teacher into a small
task model. Two student families are provided; both map

* ``images (B, 1, S, S)`` float32 in ``[0, 1]`` (``S`` divisible by 16) to
* ``logits (B, K+1, S, S)`` float32 (channel 0 = background; argmax = labelmap),

and expose a *bottleneck* feature map ``(B, C_b, S/16, S/16)`` for feature distillation
(FitNets hints, Romero et al., ICLR 2015).

``unet`` / ``unet-s`` / ``unet-l`` (MONAI :class:`monai.networks.nets.UNet`)
    Residual 2D U-Net (Kerfoot et al. 2018 as implemented in MONAI), instance norm, PReLU.
    ``unet-s``: channels (8, 16, 32, 64, 128), 2 residual units per level, 0.41 M parameters.
    ``unet``: channels (16, 32, 64, 128, 256), 1 residual unit, 0.84 M parameters.
    ``unet-l``: channels (16, 32, 64, 128, 256), 2 residual units, 1.63 M parameters.
``vit_tiny``
    The paper's ViT-Tiny student: timm ``vit_tiny_patch16_224`` encoder (patch 16, width 192,
    12 blocks, 3 heads; 5.5 M parameters) at ``S x S``, one input channel, followed by a light
    progressive-upsampling decoder (4 x [3x3 conv, norm, ReLU, 2x bilinear upsampling], 96->16
    channels). The timm weights are not downloaded: random initialisation, or a local weight
    file (``weights=``; RGB patch embeddings are summed to one channel, position embeddings
    resampled).

Parameter counts and FLOPs per slice (``S = 256``, K+1 = 2 outputs, multiply-adds x 2; see
:func:`count_flops`): ``benchmarks/bench_student.py`` prints them; the figures are also in the
model card (``student`` entry).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from TSKDLib.errors import CheckpointError, ConfigError

#: Named U-Net presets: MONAI UNet ``channels``, ``strides`` and ``num_res_units``.
UNET_PRESETS = {
    "unet-s": dict(channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=2),
    "unet": dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=1),
    "unet-l": dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2),
}
ARCHITECTURES = tuple(UNET_PRESETS) + ("vit_tiny",)
#: Default student: ``unet-l``, 1.63 M parameters, 46x faster than the LiteMedSAM teacher per slice
#: on a 2-core CPU (``unet``: 55x). On CHAOS MR with three training scans (3 labelled slices per
#: organ, ``fast``, seed 0, three choices of training scans) it reaches 0.821 on the new scans
#: against ``unet``'s 0.770, and 0.912-0.920 within the training scans against 0.883-0.909, for
#: about the same distillation time (benchmarks/RESULTS.md, section 6, "Eighth pass"); the demo
#: CT keeps liver/spleen 0.979/0.964. ``unet-s`` (1.7x faster than ``unet``) never learned the
#: demo's spleen at the ``fast`` budget (sections 4-5).
DEFAULT_ARCH = "unet-l"


@dataclass
class StudentConfig:
    """Which student to build.

    Attributes
    ----------
    arch:
        One of :data:`ARCHITECTURES` (default :data:`DEFAULT_ARCH`).
    num_classes:
        Number of foreground classes K; the network outputs K+1 channels.
    input_size:
        Model input size S in pixels (multiple of 16).
    weights:
        ``vit_tiny`` only: optional local timm/ViT state-dict file for the encoder.
    """

    arch: str = DEFAULT_ARCH
    num_classes: int = 1
    input_size: int = 256
    weights: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        known = {k: d[k] for k in ("arch", "num_classes", "input_size", "weights", "extra") if k in d}
        return cls(**known)


class StudentNet(nn.Module):
    """Base class: ``forward(images) -> logits``; :meth:`forward_features` also returns the
    bottleneck.

    Attributes
    ----------
    config: the :class:`StudentConfig`.
    bottleneck_channels: channels ``C_b`` of the bottleneck features.
    """

    config: StudentConfig
    bottleneck_channels: int

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B,1,S,S)`` -> ``(logits (B,K+1,S,S), bottleneck (B,C_b,S/16,S/16))``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D401
        """``images (B,1,S,S)`` float32 in [0,1] -> ``logits (B,K+1,S,S)``."""
        return self.forward_features(images)[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class UNetStudent(StudentNet):
    """MONAI residual 2D U-Net with access to its bottleneck (the innermost block's output)."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        from monai.networks.nets import UNet
        from monai.networks.layers.simplelayers import SkipConnection

        preset = UNET_PRESETS[config.arch]
        self.config = config
        self.net = UNet(spatial_dims=2, in_channels=1, out_channels=config.num_classes + 1,
                        channels=preset["channels"], strides=preset["strides"],
                        num_res_units=preset["num_res_units"], norm="instance")
        self.bottleneck_channels = int(preset["channels"][-1])
        node = self.net.model
        while True:  # walk Sequential(down, SkipConnection(sub), up) down to the bottom block
            skip = node[1]
            if not isinstance(skip, SkipConnection):
                raise RuntimeError("unexpected MONAI UNet layout")
            if isinstance(skip.submodule, nn.Sequential) and isinstance(skip.submodule[1], SkipConnection):
                node = skip.submodule
                continue
            self._bottom = skip.submodule
            break
        self._feat: torch.Tensor | None = None
        self._bottom.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._feat = output

    def forward_features(self, images):
        logits = self.net(images)
        feat, self._feat = self._feat, None
        return logits, feat

    def forward(self, images):
        return self.net(images)


class _UpBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
                         nn.ReLU(inplace=True), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))


class ViTTinyStudent(StudentNet):
    """timm ViT-Tiny/16 encoder + light progressive-upsampling decoder (SETR-PUP style,
    Zheng et al., CVPR 2021), as the ViT-Tiny student of TS-KD (arXiv 2503.06976, Sec. 4).

    The bottleneck is the last encoder layer's patch tokens as a ``(B, 192, S/16, S/16)`` map."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        import timm

        if config.input_size % 16:
            raise ConfigError(f"vit_tiny needs an input size divisible by 16, got {config.input_size}.")
        self.config = config
        self.encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=config.input_size,
                                         in_chans=1, num_classes=0, global_pool="")
        self.grid = config.input_size // 16
        dim = self.encoder.embed_dim
        self.bottleneck_channels = dim
        chans = [dim, 96, 64, 32, 16]
        self.decoder = nn.Sequential(*[_UpBlock(chans[i], chans[i + 1]) for i in range(4)])
        self.head = nn.Conv2d(16, config.num_classes + 1, 1)
        if config.weights:
            load_vit_weights(self.encoder, config.weights)

    def forward_features(self, images):
        x = (images - 0.5) / 0.5  # timm ViT convention: inputs centred on 0
        tokens = self.encoder.forward_features(x)  # (B, prefix + g*g, C)
        prefix = tokens.shape[1] - self.grid * self.grid
        feat = tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid)
        return self.head(self.decoder(feat)), feat


def load_vit_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local timm ViT-Tiny state dict (``.pth``/``.bin``/``.safetensors``) into ``encoder``.

    RGB patch-embedding kernels are summed to one input channel and absolute position
    embeddings are resampled to the encoder's grid (timm ``resample_abs_pos_embed``); the
    classifier head is dropped.

    Raises :class:`CheckpointError` if the file is missing, unreadable or does not match."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("ViT weight file not found.", path, "Give a local timm vit_tiny_patch16 weight file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
    except Exception as exc:  # corrupt zip/pickle/safetensors
        raise CheckpointError(f"ViT weight file could not be read ({exc}).", path) from None
    from timm.layers import resample_abs_pos_embed

    state = {k: v for k, v in state.items() if not k.startswith("head")}
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != 1:
        state["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != encoder.pos_embed.shape:
        prefix = 0 if getattr(encoder, "no_embed_class", False) else getattr(encoder, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(pe, list(encoder.patch_embed.grid_size), num_prefix_tokens=prefix)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"ViT weights do not fit vit_tiny_patch16 ({str(exc).splitlines()[0]}).", path) from None
    if len(missing) > 4:
        raise CheckpointError(f"ViT weight file misses {len(missing)} encoder tensors (e.g. {missing[:3]}).", path,
                              "Use a vit_tiny_patch16_224 checkpoint.")


def build_student(config: StudentConfig | str | None = None, num_classes: int | None = None,
                  input_size: int | None = None) -> StudentNet:
    """Create a student network.

    Parameters
    ----------
    config:
        A :class:`StudentConfig` or an architecture name (see :data:`ARCHITECTURES`).
    num_classes, input_size:
        Override K and S of the config.

    Raises :class:`ConfigError` for an unknown architecture or an input size not divisible by 16.
    """
    if config is None or isinstance(config, str):
        config = StudentConfig(arch=config or DEFAULT_ARCH)
    else:
        config = StudentConfig.from_dict(config.to_dict())
    if num_classes is not None:
        config.num_classes = int(num_classes)
    if input_size is not None:
        config.input_size = int(input_size)
    if config.input_size % 16:
        raise ConfigError(f"student input size must be a multiple of 16, got {config.input_size}.")
    if config.arch in UNET_PRESETS:
        return UNetStudent(config)
    if config.arch == "vit_tiny":
        return ViTTinyStudent(config)
    raise ConfigError(f"unknown student architecture {config.arch!r}; choose one of {list(ARCHITECTURES)}.")


def count_flops(model: nn.Module, input_size: int = 256) -> int:
    """Floating-point operations of one forward pass on one ``(1, 1, S, S)`` slice.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matrix multiplies and
    convolutions, 2 FLOPs per multiply-add; norms and activations not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 1, input_size, input_size))
    model.train(was)
    return int(counter.get_total_flops())


def describe_student(model: StudentNet) -> dict:
    """Model-card entry: ``{"arch", "parameters", "flops_per_slice", "input_size", "num_classes"}``."""
    cfg = model.config
    return {"arch": cfg.arch, "parameters": model.num_parameters(),
            "flops_per_slice": count_flops(model, cfg.input_size), "input_size": cfg.input_size,
            "num_classes": cfg.num_classes, "config": cfg.to_dict()}


def save_student(model: StudentNet, path: str | Path) -> None:
    """Atomically save ``{"config", "state_dict"}`` to ``path`` (a torch file)."""
    from TSKDLib.data.io import atomic_write

    payload = {"config": model.config.to_dict(), "state_dict": model.state_dict()}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp), overwrite=True)


def load_student(path: str | Path) -> StudentNet:
    """Inverse of :func:`save_student`. Raises :class:`CheckpointError` on a missing/corrupt file."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        cfg = StudentConfig.from_dict(payload["config"])
        cfg.weights = None  # the state dict already holds them
        model = build_student(cfg)
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:  # noqa: BLE001 - unpickling/zip/shape errors alike
        raise CheckpointError(f"student checkpoint could not be loaded ({str(exc).splitlines()[0]}).", path,
                              "Re-run the distillation stage.") from None
    return model
