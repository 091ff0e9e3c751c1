"""The networks a teacher or a student is made of: one module per family (`edm`: EDM's, Karras et al. 2022)."""

import torch

__all__ = ["one_hot"]


def one_hot(classes: torch.Tensor, label_dim: int) -> torch.Tensor:
    """Class indices [n] as every network here takes them (EDM's `class_labels`): one-hot float32 rows [n, L]."""
    return torch.nn.functional.one_hot(classes, label_dim).to(torch.float32)
