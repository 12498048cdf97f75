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

from TSKDLib.engine.loop import ResumeFile, Trainer, autocast, checkpoint_hook, cpu_threads, warmup_constant
from TSKDLib.errors import CheckpointError, ConfigError
from TSKDLib.synthesis.config import TRAIN_FIELDS, SynthesisConfig
from TSKDLib.data.io import atomic_dir
from TSKDLib.engine.runtime import resolve_device

log = logging.getLogger(__name__)

META_FILE = "tskd_diffusion.json"




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
            with autocast(dev, mixed_precision):
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
        steps and at the end (:class:`TSKDLib.engine.loop.ResumeFile`); an existing one is resumed
        (model, EMA, optimiser, data/noise RNG), so an interrupted run ends with the same weights
        as an uninterrupted one (on CPU).
    on_step:
        ``callable(step, loss)`` after each step (progress; may raise to interrupt).

    Returns a :class:`TrainResult` whose model holds the EMA weights, in eval mode.

    Raises :class:`CheckpointError` when the checkpoint is unreadable or from other settings or
    data (naming each changed setting).

    The loop is :class:`TSKDLib.engine.loop.Trainer` (AdamW, linear warm-up then constant learning
    rate, gradient clipping at norm 1, autocast on CUDA) with an EMA hook and a checkpoint hook.
    """
    with cpu_threads(config.threads):
        return _DiffusionTraining(images, labels, num_classes, config, work_dir).run(on_step)


class _DiffusionTraining:
    """One :func:`train_diffusion` call: data in model space, UNet + EMA, engine, checkpoint."""

    def __init__(self, images, labels, num_classes: int, config: SynthesisConfig, work_dir):
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, S, S); got {tuple(images.shape)}.")
        if images.shape[0] == 0:
            raise ConfigError("no slice to train the diffusion model on.")
        self.config, self.num_classes = config, num_classes
        self.dev = dev = resolve_device(config.device)
        self.x_all = to_model_space(images, config.resolution)
        if labels is None:
            labels = torch.full((images.shape[0], images.shape[-2], images.shape[-1]), -1, dtype=torch.long)
        self.lab_all = labels_to_resolution(labels, config.resolution)
        torch.manual_seed(config.seed)  # UNet initialisation
        self.model = DiffusionModel.create(config, num_classes)
        self.unet = self.model.unet.to(dev).train()
        self.ema = [p.detach().clone() for p in self.unet.parameters()]
        opt = torch.optim.AdamW(self.unet.parameters(), lr=config.lr, weight_decay=0.0)
        self.trainer = Trainer(self.unet, opt, dev, lambda step: config.lr * warmup_constant(step, config.warmup_steps),
                               config.steps, clip_grad_norm=1.0, mixed_precision=config.mixed_precision)
        self.alphas = _diffusers().DDPMScheduler(**self.model.schedule).alphas_cumprod.to(dev)
        self.gen = torch.Generator().manual_seed(config.seed + 1)
        self.losses: list[float] = []
        path = None
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
            path = Path(work_dir) / "checkpoint.pt"
        identity = {"settings": {n: getattr(config, n) for n in TRAIN_FIELDS},
                    "data": {"slices": int(images.shape[0]), "num_classes": num_classes}}
        self.resume = ResumeFile(path, "synthesis (diffusion)", identity)

    def _restore(self) -> int:
        state = self.resume.load()
        if state is None:
            return 0
        self.unet.load_state_dict(state["unet"])
        for e, v in zip(self.ema, state["ema"]):
            e.copy_(v)
        self.trainer.load_state_dict(state)
        self.gen.set_state(state["gen"])
        self.losses = list(state["losses"])
        return int(state["step"])

    def _payload(self, step: int) -> dict:
        return {"unet": self.unet.state_dict(), "ema": self.ema, **self.trainer.state_dict(),
                "gen": self.gen.get_state(), "losses": self.losses, "step": step}

    def _train_step(self, step: int) -> torch.Tensor:
        """DDPM loss of one batch: noise a random timestep, predict the configured target."""
        config, gen, dev = self.config, self.gen, self.dev
        idx = torch.randint(0, self.x_all.shape[0], (config.batch_size,), generator=gen)
        x0, lab = self.x_all[idx], self.lab_all[idx]
        if config.augment:
            theta = random_affine(len(idx), gen)
            keep = torch.rand(len(idx), generator=gen) < 0.5
            theta[keep] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
            x0 = warp(x0 + 1, theta, "bilinear") - 1  # zero padding in [0,1] space
            lab = warp_labels(lab, theta)
        t = torch.randint(0, len(self.alphas), (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(len(idx), generator=gen) < config.uncond_prob
        x0, t, noise = x0.to(dev), t.to(dev), noise.to(dev)
        a = self.alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM forward process q(x_t | x_0)
        inp = xt
        if self.model.cond_channels:
            inp = torch.cat([xt, make_condition(lab, self.num_classes, ~drop).to(dev)], 1)
        if config.prediction_type == "epsilon":
            target = noise
        elif config.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        else:
            target = x0
        with self.trainer.autocast():
            pred = self.trainer.net(inp, t).sample
        self.loss = F.mse_loss(pred.float(), target)
        return self.loss

    def _ema(self, step: int) -> None:
        """EMA of the weights (decay warmed up as ``(1 + s) / (10 + s)``), and the step's loss."""
        decay = min(self.config.ema_decay, step / (9 + step))
        with torch.no_grad():
            for e, p in zip(self.ema, self.unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        self.losses.append(float(self.loss.detach()))

    def run(self, on_step) -> TrainResult:
        start = self._restore()
        t0 = time.monotonic()
        hooks = [self._ema, checkpoint_hook(self.resume, self.config.checkpoint_every, self._payload, self.trainer)]
        if on_step is not None:
            hooks.append(lambda step: on_step(step, self.losses[-1]))
        step = self.trainer.fit(start, self._train_step, hooks)
        if self.resume.path is not None and not self.resume.path.exists():
            self.resume.save(self._payload(step))
        with torch.no_grad():
            for e, p in zip(self.ema, self.unet.parameters()):
                p.copy_(e)
        self.unet.eval()
        return TrainResult(self.model, self.losses, time.monotonic() - t0, start)
