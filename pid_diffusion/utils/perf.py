"""Speed options that wrap the existing networks without editing them.

Activation recomputation (Chen et al. 2016, "gradient checkpointing"; the option is
`train.activation_checkpointing`): a recomputed segment keeps only its inputs during the forward pass and
recomputes its activations in the backward pass, trading one extra forward of the segment for most of its
activation memory. A PID step holds two such memories at its peak, the student's and LPIPS' VGG16 (at 224×224,
the larger one), so both can be recomputed:

- the U-Net blocks of the student (`enable_activation_recomputation`): state-dict keys, parameters and
  numbers are unchanged, so training states written with and without it are interchangeable;
- the five VGG16 stages of an LPIPS metric (`enable_lpips_recomputation`), each ending at a feature layer.

On the CPU, `retain_freed_cpu_memory` stops glibc's malloc from handing freed tensor memory back to the
operating system, which otherwise page-faults every activation of every step in again (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import collections
import ctypes
import platform

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.utils.checkpoint import checkpoint

from pid_diffusion.distances import PiqLPIPS, VGGLPIPS
from pid_diffusion.networks.edm import DhariwalUNet, SongUNet, UNetBlock

__all__ = ["ActivationRecomputationError", "RecomputedSequential", "RecomputedUNetBlock",
           "disable_activation_recomputation", "enable_activation_recomputation", "enable_lpips_recomputation",
           "retain_freed_cpu_memory"]

# glibc's mallopt parameters (malloc.h) and the value that switches their dynamic adjustment off for good.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_RETAIN_BYTES = 2 ** 30  # allocations below 1 GiB come from the reusable heap, which keeps up to 1 GiB free

_UNETS = (SongUNet, DhariwalUNet)


class ActivationRecomputationError(RuntimeError):
    """A recomputed block was run in a way that activation recomputation cannot support."""


class RecomputedUNetBlock(UNetBlock):
    """A UNetBlock whose activations are recomputed in the backward pass instead of stored.

    Non-reentrant `torch.utils.checkpoint` restores the RNG state for the recomputation, so dropout draws
    the same mask twice and gradients equal those of the plain block.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Recomputation runs the block again without its tangents, and the backward pass of a
        # forward-mode AD graph then fails deep inside torch with a "different number of tensors" error.
        if any(forward_ad.unpack_dual(t).tangent is not None for t in (x, emb)):
            raise ActivationRecomputationError(
                "activation recomputation (train.activation_checkpointing) cannot run under forward-mode AD "
                "(torch.autograd.forward_ad, PID's Derivative.JVP): torch.utils.checkpoint does not recompute "
                "tangents. Use a finite-difference derivative (forward or central), or call "
                "disable_activation_recomputation(model)")
        return checkpoint(super().forward, x, emb, use_reentrant=False)


def _convert_blocks(model: nn.Module, block_class: type[UNetBlock]) -> int:
    """Put a `block_class` module in the place of every U-Net block of `model`, as `nn.SyncBatchNorm`'s
    `convert_sync_batchnorm` converts batch norms; returns the number of blocks. The new module takes over the
    block's layers, parameters and settings (the same objects, not copies), so the state_dict keys, an optimizer's
    parameters and isinstance(block, UNetBlock), on which SongUNet.forward dispatches, all stay as they are."""
    unets = [module for module in model.modules() if isinstance(module, _UNETS)]
    if not unets:
        raise TypeError(f"{type(model).__name__} contains no SongUNet or DhariwalUNet; activation recomputation "
                        f"applies to EDM's U-Nets (an EDMPrecond, a PIDStudent or the raw network)")
    blocks = [(part, name) for unet in unets for part in (unet.enc, unet.dec)
              for name, block in part.items() if isinstance(block, UNetBlock)]
    for part, name in blocks:
        converted = block_class.__new__(block_class)  # not its constructor, which would build new layers
        converted.__dict__.update(part[name].__dict__)
        part[name] = converted
    return len(blocks)


def enable_activation_recomputation(model: nn.Module) -> int:
    """Recompute every U-Net block of `model` in the backward pass, in place; returns the number of blocks.
    Idempotent."""
    return _convert_blocks(model, RecomputedUNetBlock)


def disable_activation_recomputation(model: nn.Module) -> int:
    """Undo `enable_activation_recomputation` in place; returns the number of blocks."""
    return _convert_blocks(model, UNetBlock)


class RecomputedSequential(nn.Sequential):
    """An nn.Sequential whose activations are recomputed in the backward pass instead of stored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(super().forward, x, use_reentrant=False)


def enable_lpips_recomputation(metric: PiqLPIPS | VGGLPIPS) -> int:
    """Recompute the VGG16 of an LPIPS metric in place, one segment per feature layer (relu1_2 … relu5_3);
    returns the number of segments. The distances and their gradients are unchanged. Idempotent."""
    if isinstance(metric, VGGLPIPS):
        # The lpips package's VGG16 is already cut at its feature layers: slice1 … slice5.
        network = metric.lpips.net
        slices = [name for name, _ in network.named_children() if name.startswith("slice")]
        for name in slices:  # the same layers under the same names: the state_dict keys stay
            layers = collections.OrderedDict(getattr(network, name).named_children())
            setattr(network, name, RecomputedSequential(layers))
        return len(slices)
    if not isinstance(metric, PiqLPIPS):
        raise TypeError(f"{type(metric).__name__} is not an LPIPS metric; LPIPS recomputation applies to PiqLPIPS "
                        f"and VGGLPIPS (the closed-form distances store no activations worth recomputing)")
    content = metric.lpips
    if all(isinstance(stage, RecomputedSequential) for stage in content.model.children()):
        return len(content.model)
    # piq's get_features runs `content.model`'s children in order and keeps the outputs of those named in
    # `content.layers`: regroup the children into segments named after the layer that ends each.
    segments, current = collections.OrderedDict(), []
    for name, layer in content.model.named_children():
        current.append(layer)
        if name in content.layers:
            segments[name], current = RecomputedSequential(*current), []
    if current:  # layers after the last feature layer (unused by LPIPS, kept so the network is unchanged)
        segments[name] = RecomputedSequential(*current)
    content.model = nn.Sequential(segments)
    return len(segments)


def retain_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: large tensors stop being mmap-ed and unmapped, and the
    heap is no longer trimmed, so a training step reuses the pages of the previous one instead of faulting
    them in again (zeroed by the kernel). The process keeps its peak memory. Returns False, changing nothing,
    where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, _RETAIN_BYTES)):
        raise RuntimeError("glibc's mallopt refused the mmap/trim thresholds; run without retain_freed_cpu_memory")
    return True
