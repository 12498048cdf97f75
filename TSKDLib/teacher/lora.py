"""Low-rank adaptation (LoRA, Hu et al., ICLR 2022) of a SAM-family model through ``peft``.

The teacher of TS-KD is the foundation model fine-tuned on the task with LoRA, all pre-trained
weights frozen (Liang et al., arXiv 2503.06976, method: task-specific fine-tuning of the VFM).
Adapters go on linear layers chosen by *groups*:

``encoder_attn``  image-encoder attention projections (TinyViT/ViT ``attn.qkv``, ``attn.proj``)
``encoder_mlp``   image-encoder MLPs (TinyViT ``mlp.fc1/fc2``, ViT ``mlp.lin1/lin2``)
``decoder_attn``  mask-decoder two-way transformer attention (``q_proj``, ``k_proj``, ``v_proj``,
                  ``out_proj`` of every attention block)
``decoder_mlp``   mask-decoder transformer MLPs (``mlp.lin1/lin2``)

Patterns are full-match regular expressions on module names relative to
:class:`~TSKDLib.teacher.backbones.FoundationModel` (peft ``target_modules`` given as a string).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from TSKDLib.errors import ConfigError

LORA_GROUPS = {
    "encoder_attn": r"image_encoder\..*\.attn\.(qkv|proj)",
    "encoder_mlp": r"image_encoder\..*\.mlp\.(fc1|fc2|lin1|lin2)",
    "decoder_attn": r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj)",
    "decoder_mlp": r"mask_decoder\.transformer\.layers\.\d+\.mlp\.(lin1|lin2)",
}

#: Default groups: attention of encoder and decoder, as in the paper's LoRA teacher (and SAMed,
#: Zhang & Liu 2023): attention projections carry most of the task adaptation per parameter.
DEFAULT_TARGETS = ("encoder_attn", "decoder_attn")
#: Groups of the CPU ``fast`` configuration: the frozen encoder's embeddings can then be cached.
FAST_TARGETS = ("decoder_attn",)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters.

    Attributes
    ----------
    rank:
        Rank r of the update ``B @ A``. Default 8: the usual LoRA setting (Hu et al. 2022) and
        within the range the TS-KD paper's rank ablation found adequate; a few MB of weights for
        LiteMedSAM.
    alpha:
        Scale numerator; the update is multiplied by ``alpha / rank`` (default 16, i.e. 2).
    dropout:
        Dropout on the LoRA branch input (default 0.05: light regularisation for the tens of
        labelled slices TS-KD targets).
    targets:
        Names of :data:`LORA_GROUPS`; empty means no adapter (prompt tokens only).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in LORA_GROUPS]
        if unknown:
            raise ConfigError(f"unknown LoRA target group(s) {unknown}.",
                              fix=f"use names from {sorted(LORA_GROUPS)}.")
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}.", fix="set lora_rank to e.g. 8.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}.", fix="set e.g. 0.05.")

    @property
    def adapts_encoder(self) -> bool:
        """True if any adapter sits in the image encoder (its embeddings then change in training)."""
        return any(t.startswith("encoder") for t in self.targets)

    def pattern(self) -> str:
        """peft ``target_modules`` regular expression for the chosen groups."""
        return "|".join(f"(?:{LORA_GROUPS[t]})" for t in self.targets)


def inject_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Add LoRA adapters to ``model`` in place with ``peft.inject_adapter_in_model``.

    Parameters
    ----------
    model:
        A :class:`~TSKDLib.teacher.backbones.FoundationModel` (module names matter).
    settings:
        Rank, alpha, dropout and target groups.

    Returns
    -------
    Names of the adapted linear layers (empty when ``settings.targets`` is empty).

    Notes
    -----
    ``lora_A`` is Kaiming-initialised from the global torch RNG and ``lora_B`` is zero, so the
    adapted model starts identical to the pre-trained one; seed the RNG before calling for
    reproducible initialisation. Only ``lora_`` parameters are left trainable.
    """
    if not settings.targets:
        return []
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.pattern(), bias="none")
    inject_adapter_in_model(config, model)
    adapted = sorted({name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if ".lora_A" in name})
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return adapted
