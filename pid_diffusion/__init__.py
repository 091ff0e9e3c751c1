"""Physics Informed Distillation (PID) of EDM diffusion models into one-step generators."""

__version__ = "0.1.0"
