"""EDM's networks (Karras et al. 2022, NVlabs/edm `training/networks.py`), reimplemented.

`SongUNet` (DDPM++ / NCSN++, Song et al. 2021), `DhariwalUNet` (ADM, Dhariwal & Nichol 2021) and the
`EDMPrecond` wrapper that turns a raw network F into the denoiser D(x; σ) of EDM Table 1. Constructor
arguments, state_dict keys, shapes, buffers and numbers are EDM's, so EDM checkpoints load with
`strict=True` and give EDM's outputs. The code is written for forward-mode AD (`torch.autograd.forward_ad`, as
loss.py's Derivative.JVP uses it): no in-place updates of activations and no custom autograd functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pid_diffusion.networks import check_dropout
from pid_diffusion.utils.values import parse_enum, plain

__all__ = [
    "Init", "InitMode", "EmbeddingType", "EncoderType", "DecoderType",
    "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding", "FourierEmbedding", "UNetBlock",
    "SongUNet", "DhariwalUNet", "EDMPrecond", "Preconditioning", "MODEL_TYPES", "EDM_PRESETS",
]


# ----------------------------------------------------------------------------------------------------------
# Options.

class InitMode(str, enum.Enum):
    """Weight initialisation scheme; the values are EDM's `init_mode` strings."""
    XAVIER_UNIFORM = "xavier_uniform"
    XAVIER_NORMAL = "xavier_normal"
    KAIMING_UNIFORM = "kaiming_uniform"
    KAIMING_NORMAL = "kaiming_normal"


class EmbeddingType(str, enum.Enum):
    """Noise-level embedding of SongUNet: DDPM++ uses positional, NCSN++ random Fourier features."""
    POSITIONAL = "positional"
    FOURIER = "fourier"


class EncoderType(str, enum.Enum):
    """SongUNet encoder: plain, with an image pyramid added at each level (skip), or a residual pyramid."""
    STANDARD = "standard"
    SKIP = "skip"
    RESIDUAL = "residual"


class DecoderType(str, enum.Enum):
    """SongUNet decoder: one output head (standard) or a head per level, upsampled and summed (skip)."""
    STANDARD = "standard"
    SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class Init:
    """Initialisation of a layer: weights drawn by `mode`, then scaled by `weight` and `bias` (EDM)."""
    mode: InitMode = InitMode.KAIMING_NORMAL
    weight: float = 1.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_enum(InitMode, self.mode, "init mode"))

    def replace(self, **changes: Any) -> Init:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def weight_init(shape: Sequence[int], mode: InitMode, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor of `shape` with the variance of the named scheme (EDM's `weight_init`)."""
    if mode is InitMode.XAVIER_UNIFORM:
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode is InitMode.XAVIER_NORMAL:
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode is InitMode.KAIMING_UNIFORM:
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    return math.sqrt(1 / fan_in) * torch.randn(*shape)


def _constructor_arguments(frame_locals: Mapping[str, Any], var_keyword: str | None = None) -> dict[str, Any]:
    """The arguments of an `__init__`, read from its `locals()` before any other local is bound.

    `var_keyword` names its `**kwargs` parameter, whose entries are recorded as arguments of their own.
    """
    skipped = ("self", "__class__", var_keyword)
    arguments = {name: value for name, value in frame_locals.items() if name not in skipped}
    if var_keyword is not None:
        arguments.update(frame_locals[var_keyword])
    return plain(arguments, "constructor arguments")


# ----------------------------------------------------------------------------------------------------------
# Layers. Weights are cast to the input's dtype on every call, so one float32 copy serves fp16/fp64 paths.

class Linear(nn.Module):
    """Fully connected layer y = x Wᵀ + b with EDM's initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init = Init()):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init.mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init.weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init.bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """2-D convolution with optional 2× up/downsampling by a separable FIR filter (EDM's `Conv2d`).

    `kernel=0` gives a weightless layer that only resamples. Downsampling filters then convolves;
    upsampling zero-stuffs through the transposed filter (×4 keeps the mean) then convolves.
    `fused_resample` swaps the order for downsampling (conv then filter) and merges the paddings.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init: Init = Init()):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample; set at most one of up/down")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init.mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init.weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init.bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        taps = taps.outer(taps).unsqueeze(0).unsqueeze(1) / taps.sum().square()
        # Only resampling layers carry the buffer: EDM's state dicts have it exactly there.
        self.register_buffer("resample_filter", taps if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        # The bias is added after the convolution, not inside it, to round exactly as EDM does.
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups (EDM)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        if num_channels < min_channels_per_group:
            raise ValueError(f"GroupNorm over {num_channels} channels needs at least {min_channels_per_group}; "
                             "use more channels (model_channels) or a smaller min_channels_per_group")
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x ω_i), sin(x ω_i)], ω_i = (1/max_positions)^(i / (C/2 − endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EDM computes the frequencies in float32 whatever the input dtype; so do we, to match it.
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.outer(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π x f), sin(2π x f)], f ~ N(0, scale²) fixed at construction (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.outer((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Leave any autocast region, whose bfloat16/float16 casts would otherwise undo explicit float32 ones."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()  # No autocast here (or none possible, as on the meta device).


def multi_head_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention over pixels from a [N, 3C, H, W] qkv map in EDM's channel layout; returns [N, C, H, W].

    Channel (head·C/h + c)·3 + j of `qkv` holds q, k or v (j = 0, 1, 2) of channel c in that head, as in
    EDM's checkpoints. Logits and softmax are computed in float32 (float64 for float64 input) for every input dtype (EDM's
    `AttentionOp`), written with plain differentiable ops so that forward-mode AD works.
    """
    batch, channels3, height, width = qkv.shape
    channels = channels3 // 3
    q, k, v = qkv.reshape(batch * num_heads, channels // num_heads, 3, height * width).unbind(2)
    wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for a float64 reference pass
    with _float32_region(qkv.device.type):
        logits = torch.einsum("ncq,nck->nqk", q.to(wide), (k / math.sqrt(k.shape[1])).to(wide))
        # The softmax written out: torch's own forward-mode rule modifies a saved tensor in place, which
        # breaks backpropagation through a time-derivative tangent (PID's Derivative.JVP). Subtracting the
        # detached row maximum changes nothing mathematically and keeps exp() from overflowing.
        weights = (logits - logits.amax(dim=2, keepdim=True).detach()).exp()
        weights = (weights / weights.sum(dim=2, keepdim=True)).to(q.dtype)
    a = torch.einsum("nqk,nck->ncq", weights, v)
    return a.reshape(batch, channels, height, width)


# ----------------------------------------------------------------------------------------------------------
# U-Net block shared by both architectures.

class UNetBlock(nn.Module):
    """Residual block with noise-embedding modulation and optional resampling and self-attention (EDM).

    DDPM++ adds the embedding before the second normalisation; ADM (`adaptive_scale`) uses it as a
    per-channel scale and shift after it. Attention heads: `num_heads` if given, else
    out_channels // channels_per_head (possibly 0: no attention layers).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: Init = Init(), init_zero: Init = Init(weight=0),
                 init_attn: Init | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        check_dropout(dropout)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        # Registration order fixes EDM's state_dict order: norm0, conv0, affine, norm1, conv1, skip, attention.
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, init=init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init=init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init=init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A weightless (kernel 0) skip only resamples: ADM's parameter-free shortcut.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, init=init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              init=init_attn if init_attn is not None else init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init=init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            a = multi_head_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


def _check_unet_shape(img_resolution: int, channel_mult: Sequence[int]) -> None:
    """Fail early on a U-Net shape whose levels would not halve the resolution evenly."""
    if not channel_mult:
        raise ValueError("channel_mult is empty; give one channel multiplier per resolution level, e.g. [1, 2, 2]")
    if img_resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(f"img_resolution={img_resolution} cannot be halved {len(channel_mult) - 1} times "
                         f"(channel_mult={list(channel_mult)}); use a resolution divisible by "
                         f"{1 << (len(channel_mult) - 1)} or fewer levels")


def _drop_labels(class_labels: torch.Tensor, label_dropout: float, training: bool) -> torch.Tensor:
    """Zero each sample's label with probability `label_dropout` during training (classifier-free guidance)."""
    if not (training and label_dropout):
        return class_labels
    keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


# ----------------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++.

class SongUNet(nn.Module):
    """U-Net of Song et al. (2021): DDPM++ (positional, standard) and NCSN++ (fourier, residual) in EDM.

    Called as F(x, noise_labels, class_labels, augment_labels=None). Argument names and defaults are EDM's.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        init_kwargs = _constructor_arguments(locals())
        embedding = parse_enum(EmbeddingType, embedding_type, "embedding_type")
        encoder = parse_enum(EncoderType, encoder_type, "encoder_type")
        decoder = parse_enum(DecoderType, decoder_type, "decoder_type")
        _check_unet_shape(img_resolution, channel_mult)
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = Init(mode=InitMode.XAVIER_UNIFORM)
        init_zero = init.replace(weight=1e-5)
        init_attn = init.replace(weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping.
        if embedding is EmbeddingType.POSITIONAL:
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, init=init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, init=init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)

        # Encoder. `aux` layers carry the input image pyramid (skip / residual encoders).
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, init=init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder is EncoderType.SKIP:
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, init=init)
                if encoder is EncoderType.RESIDUAL:
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, init=init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder. Attention only in the last block of an attention level (and in the bottleneck).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
            if decoder is DecoderType.SKIP or level == 0:
                if decoder is DecoderType.SKIP and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, init=init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        # Mapping. DDPM++ orders the embedding [sin, cos]: swap the halves of [cos, sin].
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder. Each output head adds its image to the (upsampled) sum of the coarser ones.
        aux = None
        head = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                head = block(x)
            elif "aux_conv" in name:
                head = block(F.silu(head))
                aux = head if aux is None else head + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# ----------------------------------------------------------------------------------------------------------
# ADM.

class DhariwalUNet(nn.Module):
    """ADM U-Net of Dhariwal & Nichol (2021) as in EDM: adaptive scale/shift, 64 channels per attention head.

    Called as F(x, noise_labels, class_labels, augment_labels=None). Argument names and defaults are EDM's.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        init_kwargs = _constructor_arguments(locals())
        _check_unet_shape(img_resolution, channel_mult)
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = Init(mode=InitMode.KAIMING_UNIFORM, weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
        init_zero = Init(mode=InitMode.KAIMING_UNIFORM, weight=0, bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False,
                                   init=Init(InitMode.KAIMING_NORMAL, weight=math.sqrt(2)))
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False,
                                 init=Init(InitMode.KAIMING_NORMAL, weight=math.sqrt(label_dim)))
                          if label_dim else None)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, init=init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, init=init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        # Mapping. ADM adds the (unscaled) label embedding after the second mapping layer.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# ----------------------------------------------------------------------------------------------------------
# Preconditioning (EDM Table 1).

MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class Preconditioning(NamedTuple):
    """EDM's preconditioning coefficients at σ: D(x; σ) = c_skip x + c_out F(c_in x; c_noise)."""
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


class EDMPrecond(nn.Module):
    """EDM's denoiser D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) around a raw U-Net F.

    `model_type` names the network class as EDM's checkpoints record it; other keyword arguments go to it.
    With `use_fp16` the image path of F runs in float16 on CUDA; the output is always float32.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs: Any):
        init_kwargs = _constructor_arguments(locals(), var_keyword="model_kwargs")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is unknown; choose one of {sorted(MODEL_TYPES)}")
        super().__init__()
        self.init_kwargs = init_kwargs
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def preconditioning(self, sigma: torch.Tensor) -> Preconditioning:
        """c_skip, c_out, c_in, c_noise of EDM Table 1, in σ's dtype and shape."""
        sigma_data = self.sigma_data
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
        c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return Preconditioning(c_skip, c_out, c_in, c_noise)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, force_fp32: bool = False) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if use_fp16 else torch.float32

        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """EDM's denoiser accepts any σ: no rounding."""
        return torch.as_tensor(sigma)


# ----------------------------------------------------------------------------------------------------------
# The official EDM checkpoints (constructor arguments as recorded in their pickles).

# EDM's train.py: --arch=ddpmpp and --arch=ncsnpp give these SongUNet arguments, with model_channels 128 and
# channel_mult from --cres; any --augment > 0 sets augment_dim 9 (every SongUNet release). ADM has no
# augmentation and runs its image path in fp16 on CUDA.
_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
               decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128)
_NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
               decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128)


def _release(arch: dict[str, Any], resolution: int, label_dim: int, channel_mult: list[int],
             dropout: float) -> dict[str, Any]:
    """A SongUNet release: 3 colour channels, augment_dim 9, float32."""
    return dict(img_resolution=resolution, img_channels=3, label_dim=label_dim, use_fp16=False, **arch,
                channel_mult=channel_mult, augment_dim=9, dropout=dropout)


EDM_PRESETS: dict[str, dict[str, Any]] = {
    "edm-cifar10-32x32-cond-vp": _release(_DDPMPP, 32, 10, [2, 2, 2], 0.13),
    "edm-cifar10-32x32-cond-ve": _release(_NCSNPP, 32, 10, [2, 2, 2], 0.13),
    "edm-cifar10-32x32-uncond-vp": _release(_DDPMPP, 32, 0, [2, 2, 2], 0.13),
    "edm-cifar10-32x32-uncond-ve": _release(_NCSNPP, 32, 0, [2, 2, 2], 0.13),
    "edm-ffhq-64x64-uncond-vp": _release(_DDPMPP, 64, 0, [1, 2, 2, 2], 0.05),
    "edm-ffhq-64x64-uncond-ve": _release(_NCSNPP, 64, 0, [1, 2, 2, 2], 0.05),
    "edm-afhqv2-64x64-uncond-vp": _release(_DDPMPP, 64, 0, [1, 2, 2, 2], 0.25),
    "edm-afhqv2-64x64-uncond-ve": _release(_NCSNPP, 64, 0, [1, 2, 2, 2], 0.25),
    "edm-imagenet-64x64-cond-adm": dict(
        img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type="DhariwalUNet",
        model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1),
}
