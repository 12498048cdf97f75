"""Configuration of the synthesis stage (diffusion model, sampling, teacher labelling, filtering).

Presets are sized for the machine they run on: ``fast`` is a CPU smoke run (about 2-3 minutes on
2 CPU cores, including sampling), ``balanced`` a useful CPU run or a short GPU run, ``quality`` a
GPU run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

from TSKDLib.pipeline.presets import TrainingSettings, upgrade_names
from TSKDLib.errors import ConfigError

CONDITIONING_MODES = ("mask", "none")
SAMPLERS = ("ddim", "dpm")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: Fields that change the trained diffusion model (hence the training cache key).
TRAIN_FIELDS = ("resolution", "block_out_channels", "layers_per_block", "attention", "conditioning",
                "uncond_prob", "steps", "batch_size", "lr", "warmup_steps",
                "ema_decay", "augment", "num_train_timesteps", "beta_schedule", "prediction_type",
                "seed", "init_model_dir")
#: Fields that change the sampled images (besides the model).
SAMPLE_FIELDS = ("sampler", "sample_steps", "guidance_scale", "seed", "mask_augment")


@dataclass
class SynthesisConfig(TrainingSettings):
    """Settings of :func:`TSKDLib.synthesis.run_synthesis`.

    Diffusion model (DDPM, Ho et al. 2020, with the ``diffusers`` ``UNet2DModel``):

    resolution:
        Side of the square images the diffusion model is trained on and generates (the data
        layer's slices are area-downsampled to it; generated images are bilinearly upsampled back
        to the teacher's size ``S``). Must be divisible by ``2 ** (len(block_out_channels) - 1)``.
    block_out_channels:
        UNet channel width per resolution level (its length is the number of levels).
    layers_per_block:
        ResNet blocks per UNet level.
    attention:
        Self-attention in the lowest-resolution level (costly on CPU).
    conditioning:
        ``"mask"``: the label map is an extra input (one-hot of the K foreground classes plus a
        "mask given" flag channel); at sampling the model is conditioned on real label maps
        (randomly shifted / rotated / scaled), so synthetic slices contain the target
        structures where the mask puts them. Unlabelled slices, and labelled ones with probability
        ``uncond_prob``, are trained with an empty condition (classifier-free guidance training,
        Ho & Salimans 2022), so all slices are used. ``"none"``: unconditional generation.
    uncond_prob:
        Probability of dropping the mask of a labelled slice during training (``mask`` mode).
    steps, batch_size, lr, warmup_steps:
        AdamW steps, images per step, peak learning rate, linear warm-up steps (then constant:
        :func:`TSKDLib.engine.loop.warmup_constant`). Older configs call them ``train_steps`` and
        ``learning_rate``.
    ema_decay:
        Exponential moving average of the weights used for sampling (with the usual warm-up
        ``min(decay, (1 + step) / (10 + step))``).
    augment:
        Random small joint affine (rotation +-10 degrees, scale 0.9-1.1, shift +-5 %) of image and
        mask during training, applied to half of the samples.
    num_train_timesteps, beta_schedule, prediction_type:
        DDPM noise schedule (``squaredcos_cap_v2`` = cosine schedule, Nichol & Dhariwal 2021) and
        the network target.
    checkpoint_every:
        Training checkpoint interval in steps (atomic write; a killed run resumes from it).
    init_model_dir:
        Optional local ``diffusers`` directory (``save_pretrained`` of a ``UNet2DModel``, or a
        pipeline folder with a ``unet/`` subfolder) to start from instead of from scratch. Its
        ``in_channels``/``sample_size`` must fit ``conditioning``/``resolution``. Nothing is
        downloaded.

    Sampling:

    sampler:
        ``"ddim"`` (Song et al. 2021, eta = 0) or ``"dpm"`` (DPM-Solver++ multistep, Lu et al.
        2022). Both deterministic given the initial noise.
    sample_steps:
        Denoising steps.
    guidance_scale:
        Classifier-free guidance scale in ``mask`` mode; 1.0 = plain conditional model (one
        network call per step), > 1 doubles the cost.
    mask_augment:
        Randomly shift / rotate / scale the real label maps used as conditions.
    num_images:
        Synthetic slices to generate (before filtering).
    sample_batch_size, label_batch_size:
        Batch sizes of sampling and of the teacher labelling calls.

    Filtering (TS-KD, Liang et al., arXiv 2503.06976, labels synthetic images with the fine-tuned
    teacher; unsure labels are dropped here):

    min_confidence:
        Keep a synthetic slice when the teacher's confidence (mean max-probability over the
        structure region, see :func:`TSKDLib.synthesis.teacher_confidence`) is at least the
        effective threshold: this value, lowered to the ``real_confidence_quantile`` quantile of
        the teacher's confidence on the *real* slices when that is lower (a weak teacher is unsure
        on real slices too; an absolute bar would then drop every synthetic slice).
    real_confidence_quantile:
        See ``min_confidence``; None = use ``min_confidence`` as an absolute threshold.
    max_entropy:
        Optional upper bound on the mean normalised entropy over the same region (None = off).
    min_condition_dice:
        Mask-conditioned sampling only: keep a synthetic slice only when the teacher's label of it
        agrees with the mask it was generated from (Dice >= this; a check that can fail, unlike
        confidence: the fine-tuned teacher is confidently wrong on unrealistic samples,
        benchmarks/RESULTS.md section 3). None = off. When no slice passes, the run says so and
        goes on with the real slices alone.

    Runtime:

    seed:
        Seeds training (initialisation, batches, noise) and sampling (image ``i`` uses seed
        ``seed * 1_000_003 + i``): the same seed gives the same images.
    device:
        ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda[:n]"``.
    mixed_precision:
        Autocast (bfloat16, or float16 with loss scaling) on CUDA; ignored on CPU.
    threads:
        ``torch.set_num_threads`` for the stage (None = leave as is; older name ``num_threads``).
    """

    resolution: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False
    conditioning: str = "mask"
    uncond_prob: float = 0.1
    batch_size: int = 16
    ema_decay: float = 0.995
    augment: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    init_model_dir: str | None = None
    sampler: str = "ddim"
    sample_steps: int = 25
    guidance_scale: float = 1.0
    mask_augment: bool = True
    num_images: int = 64
    sample_batch_size: int = 16
    label_batch_size: int = 8
    min_confidence: float = 0.75
    real_confidence_quantile: float | None = 0.1
    max_entropy: float | None = None
    min_condition_dice: float | None = 0.8
    mixed_precision: bool = True
    preset_name: str | None = field(default=None, compare=False)

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "SynthesisConfig":
        """The synthesis settings of a preset (:data:`TSKDLib.pipeline.presets.PRESETS`): ``fast`` (CPU
        smoke run, ~2-3 min on 2 cores: 64 px, tiny UNet, 150 steps, 32 images), ``balanced``
        (CPU ~30-60 min or GPU minutes: 64 px, 2 000 steps, 200 images) or ``quality`` (GPU: 96 px,
        attention, 10 000 steps, 1 000 images); keyword overrides win.

        Raises :class:`ConfigError` for an unknown preset or invalid override."""
        from TSKDLib.pipeline.presets import ALIASES, stage_preset

        values = {**stage_preset(name, "synthesis"), **upgrade_names(overrides, "synthesis"),
                  "preset_name": ALIASES.get(name, name)}
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "SynthesisConfig":
        """Build from a plain dict (JSON; older names such as ``train_steps`` are read too);
        unknown keys raise :class:`ConfigError`."""
        values = upgrade_names(values, "synthesis")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown synthesis setting(s) {unknown}; known: {sorted(known)}.")
        values = dict(values)
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(int(c) for c in values["block_out_channels"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    def replace(self, **changes) -> "SynthesisConfig":
        """A validated copy with ``changes`` (older setting names are read too)."""
        cfg = replace(self, **upgrade_names(changes, "synthesis"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        def bad(name, why):
            raise ConfigError(f"synthesis setting {name}={getattr(self, name)!r} is invalid: {why}.")
        if self.conditioning not in CONDITIONING_MODES:
            bad("conditioning", f"use one of {CONDITIONING_MODES}")
        if self.sampler not in SAMPLERS:
            bad("sampler", f"use one of {SAMPLERS}")
        if self.beta_schedule not in BETA_SCHEDULES:
            bad("beta_schedule", f"use one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            bad("prediction_type", f"use one of {PREDICTION_TYPES}")
        if not self.block_out_channels or any(c < 8 or c % 8 for c in self.block_out_channels):
            bad("block_out_channels", "give one or more widths, each a multiple of 8")
        levels = len(self.block_out_channels)
        if self.resolution < 16 or self.resolution % (2 ** (levels - 1)):
            bad("resolution", f"must be >= 16 and divisible by {2 ** (levels - 1)}")
        for name in ("layers_per_block", "batch_size", "num_train_timesteps", "sample_steps",
                     "sample_batch_size", "label_batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        for name in ("steps", "warmup_steps", "num_images"):
            if int(getattr(self, name)) < 0:
                bad(name, "must be >= 0")
        if self.sample_steps > self.num_train_timesteps:
            bad("sample_steps", "must not exceed num_train_timesteps")
        if not 0.0 <= self.uncond_prob < 1.0:
            bad("uncond_prob", "must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1)")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if self.guidance_scale < 0:
            bad("guidance_scale", "must be >= 0")
        if not 0.0 <= self.min_confidence <= 1.0:
            bad("min_confidence", "must be in [0, 1]")
        if self.real_confidence_quantile is not None and not 0.0 <= self.real_confidence_quantile <= 1.0:
            bad("real_confidence_quantile", "must be in [0, 1] or None")
        if self.min_condition_dice is not None and not 0.0 <= self.min_condition_dice <= 1.0:
            bad("min_condition_dice", "must be in [0, 1] or None")
        if self.max_entropy is not None and not 0.0 <= self.max_entropy <= 1.0:
            bad("max_entropy", "must be in [0, 1] or None")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", "use auto, cpu or cuda[:n]")

    # -- cache keys ------------------------------------------------------------------------------
    def _key(self, names, extra: str = "") -> str:
        payload = {n: getattr(self, n) for n in names}
        payload["block_out_channels"] = list(self.block_out_channels) if "block_out_channels" in names else None
        text = json.dumps(payload, sort_keys=True, default=str) + extra
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def train_key(self, data_fingerprint: str = "") -> str:
        """Short hash of everything that determines the trained model (settings + data)."""
        return self._key(TRAIN_FIELDS, data_fingerprint)

    def sample_key(self, train_key: str, size: int) -> str:
        """Short hash of everything that determines image ``i`` (model + sampling + size)."""
        return self._key(SAMPLE_FIELDS, f"{train_key}:{size}")
