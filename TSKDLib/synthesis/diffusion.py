"""A small image diffusion model trained on the user's own slices (no download).

Denoising diffusion probabilistic model (DDPM, Ho et al., NeurIPS 2020) with the ``diffusers``
``UNet2DModel`` and ``DDPMScheduler`` (training noise); sampling with DDIM (Song et al., ICLR
2021, eta = 0) or DPM-Solver++ (Lu et al., NeurIPS 2022 / arXiv 2211.01095). Optional mask
conditioning: the label map is given to the UNet as extra input channels, trained with
classifier-free dropout (Ho & Salimans 2022) so unlabelled slices are used too.

Model space: images ``(B, 1, R, R)`` in ``[-1, 1]`` (``2 * x - 1`` of the data layer's ``[0, 1]``
intensities), ``R = config.resolution``. Condition ``(B, K + 1, R, R)`` float: channels ``0..K-1``
the one-hot of foreground classes ``1..K``, channel ``K`` a constant "mask given" flag (all zeros =
no condition).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from .config import SynthesisConfig
from ..io import atomic_dir, atomic_write
from ..runtime import resolve_device

log = logging.getLogger(__name__)

META_FILE = "tskd_diffusion.json"


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous value restored after
    (``n`` None = no change). On a shared CPU, fewer threads than cores avoids oversubscription."""

    def __init__(self, n: int | None):
        self.n = n
        self.before = None

    def __enter__(self):
        if self.n:
            self.before = torch.get_num_threads()
            torch.set_num_threads(int(self.n))
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            torch.set_num_threads(self.before)
        return False


def _diffusers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # construction from configs only; never the Hub
    import diffusers
    return diffusers


# ------------------------------------------------------------------------------------------------
# Conditions, resizing, augmentation
# ------------------------------------------------------------------------------------------------
def to_model_space(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(N, 1, S, S)`` in [0, 1] -> ``(N, 1, R, R)`` in [-1, 1] (area/antialiased downsampling)."""
    x = images.float()
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.clamp(0, 1) * 2 - 1


def labels_to_resolution(labels: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(N, S, S)`` int64 class indices (``-1`` = unlabelled) -> ``(N, R, R)`` (nearest)."""
    if labels.shape[-1] == resolution:
        return labels.long()
    lab = F.interpolate(labels[:, None].float(), size=(resolution, resolution), mode="nearest")
    return lab[:, 0].round().long()


def make_condition(labels: torch.Tensor, num_classes: int, given: torch.Tensor | None = None) -> torch.Tensor:
    """Condition channels from ``(N, R, R)`` label maps.

    Returns ``(N, K + 1, R, R)`` float32: one-hot of classes ``1..K`` and a flag channel that is 1
    where the mask is given. Rows whose label map holds ``-1`` (unlabelled) or whose ``given`` is
    False are all zeros (the "no condition" input)."""
    n, r, _ = labels.shape
    has = (labels >= 0).flatten(1).all(1)
    if given is not None:
        has = has & given.to(has.device)
    lab = labels.clamp(min=0)
    onehot = F.one_hot(lab, num_classes + 1).permute(0, 3, 1, 2)[:, 1:].float()
    flag = torch.ones(n, 1, r, r, device=labels.device)
    cond = torch.cat([onehot, flag], 1)
    return cond * has[:, None, None, None].float()


def random_affine(n: int, generator: torch.Generator, rot_deg: float = 10.0, scale=(0.9, 1.1),
                  shift: float = 0.05) -> torch.Tensor:
    """``(n, 2, 3)`` affine matrices for ``F.affine_grid`` (normalised coordinates)."""
    u = torch.rand(n, 4, generator=generator)
    ang = (u[:, 0] * 2 - 1) * math.radians(rot_deg)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx = (u[:, 2] * 2 - 1) * shift * 2
    ty = (u[:, 3] * 2 - 1) * shift * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Warp ``(n, C, R, R)`` with ``(n, 2, 3)`` affines; outside is 0 (the padding value)."""
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_labels(labels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp ``(n, R, R)`` class-index maps (nearest); outside becomes background 0."""
    out = warp(labels[:, None].float(), theta, "nearest")[:, 0].round().long()
    return torch.where((labels >= 0).flatten(1).all(1)[:, None, None], out, labels)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
@dataclass
class DiffusionModel:
    """A trained (or initialised) image diffusion model.

    Attributes
    ----------
    unet: ``diffusers.UNet2DModel``; input ``(B, 1 [+ K + 1], R, R)``, output ``(B, 1, R, R)``.
    num_classes: K (foreground classes of the task).
    conditioning: ``"mask"`` or ``"none"``.
    resolution: R.
    schedule: ``DDPMScheduler`` config dict (``num_train_timesteps``, ``beta_schedule``, ...).
    """

    unet: torch.nn.Module
    num_classes: int
    conditioning: str
    resolution: int
    schedule: dict

    @property
    def cond_channels(self) -> int:
        return self.num_classes + 1 if self.conditioning == "mask" else 0

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def create(cls, config: SynthesisConfig, num_classes: int) -> "DiffusionModel":
        """A new model from ``config`` (or from ``config.init_model_dir``)."""
        d = _diffusers()
        cond = num_classes + 1 if config.conditioning == "mask" else 0
        levels = len(config.block_out_channels)
        if config.init_model_dir:
            unet = _load_unet(Path(config.init_model_dir))
            want = 1 + cond
            if unet.config.in_channels != want or unet.config.out_channels != 1:
                raise ConfigError(
                    f"init_model_dir UNet has in/out channels {unet.config.in_channels}/"
                    f"{unet.config.out_channels}; this task needs {want}/1 "
                    f"(conditioning={config.conditioning!r}, K={num_classes}).",
                    fix="Start from a model trained with the same conditioning and classes, or from scratch.")
        else:
            down = ["DownBlock2D"] * levels
            up = ["UpBlock2D"] * levels
            if config.attention:
                down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
            groups = math.gcd(8, *config.block_out_channels)
            unet = d.UNet2DModel(sample_size=config.resolution, in_channels=1 + cond, out_channels=1,
                                 block_out_channels=tuple(config.block_out_channels),
                                 layers_per_block=config.layers_per_block,
                                 down_block_types=tuple(down), up_block_types=tuple(up),
                                 norm_num_groups=groups, attention_head_dim=8)
        schedule = dict(num_train_timesteps=config.num_train_timesteps,
                        beta_schedule=config.beta_schedule, prediction_type=config.prediction_type,
                        clip_sample=False)
        return cls(unet, num_classes, config.conditioning, config.resolution, schedule)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write a ``diffusers`` model folder (``save_pretrained``) plus ``tskd_diffusion.json``,
        atomically (built beside it, then renamed). Returns the directory."""
        directory = Path(directory)
        with atomic_dir(directory, create=False) as tmp:  # full disk / permission: previous folder kept
            self.unet.save_pretrained(tmp, safe_serialization=True)
            _diffusers().DDPMScheduler(**self.schedule).save_pretrained(tmp / "scheduler")
            (tmp / META_FILE).write_text(json.dumps({"format": "tskd-diffusion", "format_version": 1,
                                                     "num_classes": self.num_classes,
                                                     "conditioning": self.conditioning,
                                                     "resolution": self.resolution,
                                                     "schedule": self.schedule}, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DiffusionModel":
        """Read a folder written by :meth:`save`. Raises :class:`CheckpointError` if unusable."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"not a TSKD diffusion model folder ({exc}).", directory,
                                  "Point at a folder written by DiffusionModel.save().") from None
        unet = _load_unet(directory).to(device)
        return cls(unet, int(meta["num_classes"]), meta["conditioning"], int(meta["resolution"]),
                   dict(meta["schedule"]))

    # -- sampling --------------------------------------------------------------------------------
    def make_scheduler(self, sampler: str):
        d = _diffusers()
        if sampler == "ddim":
            return d.DDIMScheduler(**{**self.schedule, "clip_sample": True}, set_alpha_to_one=True,
                                   timestep_spacing="trailing")
        if sampler == "dpm":
            return d.DPMSolverMultistepScheduler(
                num_train_timesteps=self.schedule["num_train_timesteps"],
                beta_schedule=self.schedule["beta_schedule"],
                prediction_type=self.schedule["prediction_type"], algorithm_type="dpmsolver++",
                solver_order=2, timestep_spacing="trailing")
        raise ConfigError(f"unknown sampler {sampler!r}; use ddim or dpm.")

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, condition: torch.Tensor | None = None, steps: int = 25,
               sampler: str = "ddim", guidance_scale: float = 1.0, mixed_precision: bool = True) -> torch.Tensor:
        """Generate images from given initial noise.

        Parameters
        ----------
        noise: ``(B, 1, R, R)`` standard normal (the caller seeds it, so images are reproducible).
        condition: ``(B, K + 1, R, R)`` from :func:`make_condition` (``mask`` mode; None or zeros =
            unconditional).
        steps: denoising steps; sampler: ``"ddim"`` or ``"dpm"``.
        guidance_scale: classifier-free guidance weight ``w``: ``eps = eps_u + w (eps_c - eps_u)``;
            1.0 uses the conditional prediction alone.

        Returns ``(B, 1, R, R)`` float32 in ``[0, 1]`` on the CPU.
        """
        dev = self.device
        self.unet.eval()
        sched = self.make_scheduler(sampler)
        sched.set_timesteps(steps, device=dev)
        x = noise.to(dev, torch.float32) * sched.init_noise_sigma
        cond = None
        if self.cond_channels:
            cond = condition.to(dev, torch.float32) if condition is not None else \
                torch.zeros(x.shape[0], self.cond_channels, *x.shape[-2:], device=dev)
        guided = cond is not None and guidance_scale != 1.0
        for t in sched.timesteps:
            with _autocast(dev, mixed_precision):
                if cond is None:
                    out = self.unet(x, t).sample
                elif guided:
                    inp = torch.cat([torch.cat([x, cond], 1), torch.cat([x, torch.zeros_like(cond)], 1)])
                    oc, ou = self.unet(inp, t).sample.chunk(2)
                    out = ou + guidance_scale * (oc - ou)
                else:
                    out = self.unet(torch.cat([x, cond], 1), t).sample
            x = sched.step(out.float(), t, x).prev_sample
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def _load_unet(directory: Path):
    d = _diffusers()
    if not directory.is_dir():
        raise CheckpointError("diffusion model folder not found.", directory,
                              "Give a local folder written by diffusers save_pretrained().")
    sub = "unet" if (directory / "unet" / "config.json").exists() else None
    try:
        return d.UNet2DModel.from_pretrained(directory, subfolder=sub, local_files_only=True)
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError variants
        raise CheckpointError(f"cannot load a UNet2DModel ({str(exc).splitlines()[0]}).", directory,
                              "Give a folder holding a diffusers UNet2DModel (config.json + weights).") from None


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------------
# Training with atomic checkpoints
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Outcome of :func:`train_diffusion`: the EMA model, per-step losses, wall time of this call
    (seconds, excluding steps restored from a checkpoint), and the step it resumed from."""

    model: DiffusionModel
    losses: list[float]
    seconds: float
    resumed_from: int


def _save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def train_diffusion(images: torch.Tensor, labels: torch.Tensor | None, num_classes: int,
                    config: SynthesisConfig, work_dir: str | Path | None = None,
                    on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume training) a DDPM on slices.

    Parameters
    ----------
    images:
        ``(N, 1, S, S)`` float32 in ``[0, 1]``, all slices (labelled and unlabelled); downsampled to
        ``config.resolution``.
    labels:
        ``(N, S, S)`` int64 class indices ``0..K``, ``-1`` on unlabelled slices; needed in ``mask``
        mode (None = all unlabelled).
    num_classes:
        K.
    work_dir:
        Checkpoint folder: ``checkpoint.pt`` is written atomically every ``config.checkpoint_every``
        steps and at the end; an existing one is resumed (model, EMA, optimiser, data/noise RNG),
        so an interrupted run ends with the same weights as an uninterrupted one (on CPU).
    on_step:
        ``callable(step, loss)`` after each step (progress; may raise to interrupt).

    Returns a :class:`TrainResult` whose model holds the EMA weights, in eval mode.

    Raises :class:`CheckpointError` when the checkpoint is unreadable or from other settings.
    """
    with torch_threads(config.num_threads):
        return _train_diffusion(images, labels, num_classes, config, work_dir, on_step)


def _train_diffusion(images, labels, num_classes, config, work_dir, on_step) -> TrainResult:
    dev = resolve_device(config.device)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, S, S); got {tuple(images.shape)}.")
    if images.shape[0] == 0:
        raise ConfigError("no slice to train the diffusion model on.")
    R = config.resolution
    x_all = to_model_space(images, R)
    if labels is None:
        labels = torch.full((images.shape[0], images.shape[-2], images.shape[-1]), -1, dtype=torch.long)
    lab_all = labels_to_resolution(labels, R)

    torch.manual_seed(config.seed)  # UNet initialisation
    model = DiffusionModel.create(config, num_classes)
    unet = model.unet.to(dev).train()
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    sched = _diffusers().DDPMScheduler(**model.schedule)
    alphas = sched.alphas_cumprod.to(dev)
    gen = torch.Generator().manual_seed(config.seed + 1)
    losses: list[float] = []
    step = 0
    use_scaler = dev.type == "cuda" and config.mixed_precision and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    ckpt_path = None
    if work_dir is not None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = work_dir / "checkpoint.pt"
        if ckpt_path.exists():
            try:
                st = torch.load(ckpt_path, map_location=dev, weights_only=False)
                if st.get("train_key") != config.train_key():
                    raise CheckpointError("diffusion checkpoint was written with other settings.",
                                          ckpt_path, "Delete it or use a fresh output folder.")
                unet.load_state_dict(st["unet"])
                for e, v in zip(ema, st["ema"]):
                    e.copy_(v)
                opt.load_state_dict(st["opt"])
                gen.set_state(st["gen"])
                losses = list(st["losses"])
                step = int(st["step"])
                if scaler is not None and st.get("scaler"):
                    scaler.load_state_dict(st["scaler"])
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"diffusion checkpoint is unreadable ({exc}).", ckpt_path,
                                      "Delete it to retrain from scratch.") from None
    resumed_from = step

    def checkpoint():
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {"unet": unet.state_dict(), "ema": ema, "opt": opt.state_dict(),
                                         "gen": gen.get_state(), "losses": losses, "step": step,
                                         "scaler": scaler.state_dict() if scaler else None,
                                         "train_key": config.train_key()})

    t0 = time.monotonic()
    n = x_all.shape[0]
    while step < config.train_steps:
        idx = torch.randint(0, n, (config.batch_size,), generator=gen)
        x0, lab = x_all[idx], lab_all[idx]
        if config.augment:
            theta = random_affine(len(idx), gen)
            keep = torch.rand(len(idx), generator=gen) < 0.5
            theta[keep] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
            x0 = warp(x0 + 1, theta, "bilinear") - 1  # zero padding in [0,1] space
            lab = warp_labels(lab, theta)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(len(idx), generator=gen) < config.uncond_prob
        x0, t, noise = x0.to(dev), t.to(dev), noise.to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM forward process q(x_t | x_0)
        inp = xt
        if model.cond_channels:
            inp = torch.cat([xt, make_condition(lab, num_classes, ~drop).to(dev)], 1)
        if config.prediction_type == "epsilon":
            target = noise
        elif config.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        else:
            target = x0
        lr_scale = min(1.0, (step + 1) / max(1, config.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = config.learning_rate * lr_scale
        with _autocast(dev, config.mixed_precision):
            pred = unet(inp, t).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        step += 1
        losses.append(float(loss.detach()))
        if step % config.checkpoint_every == 0 or step == config.train_steps:
            checkpoint()
        if on_step is not None:
            on_step(step, losses[-1])
    if ckpt_path is not None and not ckpt_path.exists():
        checkpoint()
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval()
    return TrainResult(model, losses, time.monotonic() - t0, resumed_from)
