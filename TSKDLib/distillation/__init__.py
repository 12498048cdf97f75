"""Stage 3: the student network and task-specific distillation from the teacher's outputs (Liang et al., arXiv 2503.06976, section 3.3)."""
