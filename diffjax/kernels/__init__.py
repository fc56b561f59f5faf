"""Speed paths: the hand-written kernels behind the U-Net's layers and the process-wide XLA:CPU
settings (``cpu_runtime``)."""
