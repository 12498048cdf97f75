"""Training engine shared by the teacher, the student and the diffusion model: loop, device, mixed precision, DDP, schedule, early stopping, checkpoints and resume."""
