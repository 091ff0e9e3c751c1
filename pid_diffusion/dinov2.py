"""DINOv2 ViT-L/14 (Oquab et al. 2023), the feature network of EDM2's FD_DINOv2, and its preprocessing.

EDM2's `calculate_metrics.py` loads `dinov2_vitl14` through torch hub, which downloads and runs DINOv2's
repository code. Here the same network is written out (a plain pre-norm ViT with LayerScale, DINOv2's
parameter names, so its released state dict loads with strict=True), and the weights are read from torch hub's
cache like every other pretrained file (`dinov2_vitl14_pretrain.pth`; `pid-fetch-weights` downloads it): no
downloaded code runs. The features are the CLS token after the final LayerNorm, [N, 1024].

EDM2's preprocessing (its default resize mode 'torch'): uint8 images → float32 → bicubic antialiased resize to
224×224 (neither clamped nor rounded) → /255 → ImageNet mean and std. At 224 the 37×37 grid of position
embeddings (trained at 518) is resampled by DINOv2's rule: bicubic with scale factor (16 + 0.1) / 37.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from pid_diffusion.utils import fileio, hub

__all__ = ["DINOV2", "FEATURE_DIM", "HEAD_DIM", "IMAGENET_MEAN", "IMAGENET_STD", "INPUT_SIZE", "VITL14", "DINOv2",
           "DINOv2Detector", "ViTShape", "load_dinov2", "preprocess"]

DINOV2_FILENAME = "dinov2_vitl14_pretrain.pth"
DINOV2 = hub.WeightFile(DINOV2_FILENAME, f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{DINOV2_FILENAME}",
                        used_by="DINOv2 ViT-L/14, the feature network of FD_DINOv2 (pid-fid --fd-dinov2)")
INPUT_SIZE = 224  # EDM2 resizes every image to 224×224 before DINOv2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # Every released DINOv2 ViT (S, B, L, g) has attention heads of 64 channels.
LAYER_NORM_EPS = 1e-6
INTERPOLATE_OFFSET = 0.1  # DINOv2 resamples position embeddings to (patches + 0.1) / grid (dino issue #8).


@dataclasses.dataclass(frozen=True)
class ViTShape:
    """A DINOv2 ViT's architecture: everything its constructor needs."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    grid: int = 37  # Position embeddings: grid × grid patches (DINOv2's img_size 518 / 14).
    mlp_ratio: int = 4
    in_chans: int = 3


VITL14 = ViTShape(embed_dim=1024, depth=24, num_heads=16)
FEATURE_DIM = VITL14.embed_dim


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(head dim)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # Exact (erf) GELU.


class _Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + γ₁ attn(norm(x)), then x + γ₂ mlp(norm(x))."""

    def __init__(self, shape: ViTShape):
        super().__init__()
        dim = shape.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = _Attention(dim, shape.num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = _MLP(dim, dim * shape.mlp_ratio)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, shape: ViTShape):
        super().__init__()
        self.proj = nn.Conv2d(shape.in_chans, shape.embed_dim, shape.patch_size, stride=shape.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """DINOv2's `DinoVisionTransformer` in inference: images [N, 3, H, W] (normalised, H and W multiples of the
    patch size) → the CLS token after the final LayerNorm [N, embed_dim]. Parameter names are DINOv2's;
    `mask_token` (used only in DINOv2's training) is kept so that its state dict loads strictly."""

    def __init__(self, shape: ViTShape = VITL14):
        super().__init__()
        self.shape = shape
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + shape.grid ** 2, shape.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, shape.embed_dim))
        self.patch_embed = _PatchEmbed(shape)
        self.blocks = nn.ModuleList(_Block(shape) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.embed_dim, eps=LAYER_NORM_EPS)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """[1, 1 + rows·cols, D]: the CLS position and the patch grid resampled as DINOv2 resamples it."""
        grid = self.shape.grid
        if rows == cols == grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        patches = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        # A scale factor, not a size: the sampling positions follow (n + offset) / grid, as in DINOv2.
        scale = ((rows + INTERPOLATE_OFFSET) / grid, (cols + INTERPOLATE_OFFSET) / grid)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        if patches.shape[-2:] != (rows, cols):
            raise ValueError(f"position embeddings resampled to {tuple(patches.shape[-2:])}, not {(rows, cols)}")
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = self.shape.patch_size
        if x.shape[-1] % patch or x.shape[-2] % patch:
            raise ValueError(f"DINOv2 takes images whose sides are multiples of {patch}, got {tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(x.shape[-2] // patch, x.shape[-1] // patch)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images → DINOv2's input, exactly as EDM2's DINOv2Detector (resize mode 'torch') makes it."""
    x = F.interpolate(images.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    x = x - torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return x / torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)


class DINOv2Detector:
    """DINOv2 on a device, behind the Inception detector's interface: `features` of uint8 NCHW images."""

    def __init__(self, model: DINOv2, device: torch.device | str = "cpu", source: str = ""):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.feature_dim = model.shape.embed_dim
        self.source = source  # The weights file, recorded beside the numbers.

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, feature_dim] float32 features of uint8 NCHW images (grayscale repeated to RGB)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"DINOv2 takes uint8 NCHW images with 1 or 3 channels, got {images.dtype} of shape "
                             f"{tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.model(preprocess(images.to(self.device)))


def shape_of(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> ViTShape:
    """The architecture a DINOv2-layout state dict holds; the heads (not in any shape) default to
    embed_dim / HEAD_DIM, as in every released DINOv2."""
    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        in_chans = state_dict["patch_embed.proj.weight"].shape[1]
        grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
        depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] // embed_dim
    except (KeyError, AttributeError, IndexError) as error:
        raise ValueError(f"not a DINOv2 state dict (DINOv2's key names: cls_token, pos_embed, patch_embed.proj.weight, "
                         f"blocks.<i>.…): {type(error).__name__}: {error}") from None
    return ViTShape(embed_dim=embed_dim, depth=depth, num_heads=num_heads or embed_dim // HEAD_DIM,
                    patch_size=patch_size, grid=grid, mlp_ratio=mlp_ratio, in_chans=in_chans)


def load_dinov2(path: str | None = None, device: torch.device | str = "cpu") -> DINOv2Detector:
    """DINOv2 from `path`, or from the torch hub cache when `path` is None (`dinov2_vitl14_pretrain.pth`,
    downloaded there only when a network exists; otherwise the error names the file, its URL and where to put it).

    The file is DINOv2's released state dict, or a dict {"state_dict": ..., "model_kwargs": {"num_heads": ...}}
    for a network whose heads are not 64 channels wide (DINOv2's keyword names)."""
    if path is None:
        (path,) = hub.resolve(DINOV2)
    elif not fileio.exists(path):
        raise FileNotFoundError(f"No DINOv2 weights at {path}. Download {DINOV2.url} there, or leave the path "
                                "unset to use the torch hub cache.")
    data = fileio.torch_load(path)
    num_heads = None
    if isinstance(data, dict) and "state_dict" in data:
        num_heads = data.get("model_kwargs", {}).get("num_heads")
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a DINOv2 state dict (a {type(data).__name__})")
    model = DINOv2(shape_of(data, num_heads))
    try:
        model.load_state_dict(data)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit DINOv2's layout: {error}") from None
    return DINOv2Detector(model, device, source=str(path))
