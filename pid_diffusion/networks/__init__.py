"""The networks a teacher or a student is made of: one module per family (`edm`: EDM's, Karras et al. 2022)."""

import torch

from pid_diffusion.user_error import OptionError

__all__ = ["check_dropout", "one_hot"]


def one_hot(classes: torch.Tensor, label_dim: int) -> torch.Tensor:
    """Class indices [n] as every network here takes them (EDM's `class_labels`): one-hot float32 rows [n, L]."""
    return torch.nn.functional.one_hot(classes, label_dim).to(torch.float32)


def check_dropout(dropout: float) -> None:
    """The range of a network's `dropout`, checked where its blocks are built (and by the configuration sections
    that set it, so that a run fails before it starts: `from_dict` names the section)."""
    if not 0 <= dropout < 1:
        raise OptionError(f"dropout={dropout}: need 0 ≤ dropout < 1")
