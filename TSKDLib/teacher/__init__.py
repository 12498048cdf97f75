"""Stage 1 of TS-KD: the foundation-model teacher (issue 3).

Liang et al., "Task-Specific Knowledge Distillation from the Vision Foundation Model for Enhanced
Medical Image Segmentation", arXiv 2503.06976: a SAM-family model is fine-tuned on the task with
LoRA (the *task-specific* teacher) before its knowledge is distilled into a small student; the
pre-trained model without adaptation is the *task-agnostic* baseline.

Interface (``docs/design.md``): slices ``(B, 1, S, S)`` float32 in [0, 1] ->
:class:`TeacherOutput` ``(embedding (B, 256, 64, 64), logits (B, K, S, S))``;
:func:`class_probabilities` -> ``(B, K+1, S, S)``; :func:`labelmap` -> ``(B, S, S)``.

Typical use::

    config = TeacherConfig.preset("fast")            # or TeacherConfig() for the paper setting
    teacher = build_teacher(class_map.names, config)
    teacher, history = finetune_teacher(teacher, slice_dataset, config, progress, work_dir=run / "teacher")
    save_teacher(teacher, run / "teacher", config, history)
    probs = load_teacher(run / "teacher").predict_proba(images)   # (N, K+1, S, S)
"""

from TSKDLib.teacher.backbones import (BACKENDS, LITEMEDSAM_SHA256, FoundationModel, litemedsam_checkpoint_path,
                                       load_foundation_model)
from TSKDLib.teacher.lora import DEFAULT_TARGETS, FAST_TARGETS, LORA_GROUPS, LoraSettings, inject_lora
from TSKDLib.teacher.model import (BaseTeacher, TaskAgnosticTeacher, TaskSpecificTeacher, TeacherOutput,
                                   class_probabilities, labelmap)
from TSKDLib.teacher.storage import load_teacher, read_teacher_meta, save_teacher
from TSKDLib.teacher.training import (MaskedDiceCELoss, TeacherConfig, build_teacher, dice_per_class,
                                      finetune_teacher)

__all__ = [
    "BACKENDS", "LITEMEDSAM_SHA256", "FoundationModel", "litemedsam_checkpoint_path", "load_foundation_model",
    "DEFAULT_TARGETS", "FAST_TARGETS", "LORA_GROUPS", "LoraSettings", "inject_lora",
    "BaseTeacher", "TaskAgnosticTeacher", "TaskSpecificTeacher", "TeacherOutput", "class_probabilities",
    "labelmap", "load_teacher", "read_teacher_meta", "save_teacher", "MaskedDiceCELoss", "TeacherConfig",
    "build_teacher", "dice_per_class", "finetune_teacher",
]
