"""Metrics (Dice, HD95), the paper's benchmark and the sparse-slice benchmark, Fill between slices (ITK morphological contour interpolation)."""
