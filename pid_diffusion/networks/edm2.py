"""EDM2's magnitude-preserving networks (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"), written from the paper (Appendix B, Figure 21) and checked against outputs of NVlabs/edm2.

No biases and no normalisation layers: every layer keeps activations and weights at unit magnitude (paper
Eqs. 47, 66, 75, 81, 88, 103). Constructor arguments and state_dict keys are EDM2's (`Precond` holds `unet`,
`logvar_fourier`, `logvar_linear`), so EDM2's released weights load with `strict=True`.

Precision: EDM2 computes weight norms, Fourier features and the preconditioning in float32 whatever the
activations' dtype. Here that working dtype is float32 *or wider*: a float64 network given float64 inputs
computes in float64 throughout (which EDM2's own code cannot), and float32 or float16 inputs compute exactly
as EDM2 does.

Written for PID's derivative schemes: the attention softmax is written out and activations are clipped out of
place, so reverse mode works through a forward-mode time tangent (`Derivative.JVP`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pid_diffusion.networks import check_dropout
from pid_diffusion.networks.edm import Preconditioning, _constructor_arguments

__all__ = [
    "normalize", "resample", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv", "Block", "UNet", "Precond",
    "EDM2_PRESETS", "EDM2_RELEASE_URL", "release_preset",
]

NORM_EPS = 1e-4  # ε of normalize() (EDM2's default).
SILU_MAGNITUDE = 0.596  # E[silu(x)²]^½ for x ~ N(0, 1): dividing by it keeps unit magnitude (Eq. 81).


def _working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is float64: the precision of norms, Fourier features, σ terms."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


# ----------------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.

def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = NORM_EPS) -> torch.Tensor:
    """x divided by eps + its RMS over `dim` (default: every dimension but the first); RMS in float32 or wider."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=_working_dtype(x.dtype))
    reduced = x.numel() // norm.numel()  # elements per norm
    rms = torch.add(eps, norm, alpha=math.sqrt(1 / reduced))
    return x / rms.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """Resample by 2 with the fixed separable filter f (normalised to sum 1), per channel: 'down' filters with
    stride 2, 'up' is the transposed convolution of the filter times 4 (keeping magnitude); 'keep' is x."""
    if mode == "keep":
        return x
    if mode not in ("up", "down") or len(f) % 2 != 0:
        raise ValueError(f"resample(mode={mode!r}, f={list(f)}): mode must be keep, up or down and f of even length")
    taps = torch.as_tensor(f, dtype=torch.float32)
    taps = taps / taps.sum()
    kernel = taps.outer(taps).to(device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    padding = (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, kernel.expand(channels, 1, *kernel.shape), groups=channels, stride=2, padding=padding)
    return F.conv_transpose2d(x, (kernel * 4).expand(channels, 1, *kernel.shape), groups=channels, stride=2,
                              padding=padding)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Eq. 81)."""
    return F.silu(x) / SILU_MAGNITUDE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 − t) a + t b, rescaled to unit magnitude for independent unit-magnitude a and b (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along `dim` with a and b weighted (1 − t) : t, keeping unit magnitude (Eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale / math.sqrt(n_a) * (1 - t)), b * (scale / math.sqrt(n_b) * t)], dim=dim)


# ----------------------------------------------------------------------------------------------------------
# Layers.

class MPFourier(nn.Module):
    """Magnitude-preserving random Fourier features of a scalar (Eq. 75): √2 cos(2π(f x + φ)).

    Buffers `freqs` (2π · N(0, bandwidth²)) and `phases` (2π · U[0, 1)) are drawn at construction.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _working_dtype(x.dtype)
        y = x.to(dtype).outer(self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or fully connected layer (kernel []) without bias.

    The weight is normalised per output channel and scaled by gain/√fan_in at every call (Eq. 47). In train
    mode the stored weight is first replaced, in place and outside autograd, by its normalised value: EDM2's
    forced weight normalisation (Eq. 66), which keeps the parameters on the unit sphere between optimizer
    steps. A train-mode call therefore changes the parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.weight.to(_working_dtype(self.weight.dtype))  # the parameter itself unless it is float16
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation; w sees it when it is the parameter
        fan_in = w[0].numel()
        w = (normalize(w) * (gain / math.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def _softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax written out: torch's own forward-mode rule breaks reverse mode through a tangent (PID's JVP)."""
    weights = (logits - logits.amax(dim=dim, keepdim=True).detach()).exp()
    return weights / weights.sum(dim=dim, keepdim=True)


class Block(nn.Module):
    """EDM2's U-Net block (Figure 21): resampling, a residual branch modulated by the embedding, optional
    self-attention with normalised q, k, v, and activation clipping.

    'enc' blocks apply the 1×1 channel change before the residual branch and pixel-normalise; 'dec' blocks
    change channels on the skip path after it. Attention heads: out_channels // channels_per_head.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"Block(flavor={flavor!r}, resample_mode={resample_mode!r}): flavor is enc or dec, "
                             "resample_mode keep, up or down")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        check_dropout(dropout)
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # Registration order fixes EDM2's state_dict order.
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated by the embedding (1 + a learned, initially zero, gain times a projection).
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Join the branches.
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention over pixels; channel (head, c, j) of qkv holds q, k or v (j = 0, 1, 2).
        if self.num_heads:
            qkv = self.attn_qkv(x)
            qkv = qkv.reshape(qkv.shape[0], self.num_heads, -1, 3, qkv.shape[2] * qkv.shape[3])
            q, k, v = normalize(qkv, dim=2).unbind(3)
            weights = _softmax(torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])), dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", weights, v)
            x = mp_sum(x, self.attn_proj(y.reshape(x.shape)), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2's U-Net F(x, c_noise, class_labels) (Figure 21).

    A constant ones channel is appended to the input; the embedding is mp_silu of MPFourier(c_noise) projected,
    mixed (mp_sum, `label_balance`) with the projected labels scaled by √label_dim; decoder blocks take the
    encoder's activations through mp_cat (`concat_balance`); the output conv's gain `out_gain` is learned and
    zero at initialisation.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5, concat_balance: float = 0.5,
                 **block_kwargs: Any):
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution={img_resolution} does not halve evenly over {len(channel_mult)} levels")
        block_channels = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else block_channels[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(block_channels)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None

        # Encoder: an input conv at full resolution, then per level a downsampling block (below the first) and
        # num_blocks blocks.
        def block(cin: int, cout: int, **kwargs: Any) -> Block:
            return Block(cin, cout, emb_channels, **kwargs, **block_kwargs)

        self.enc = nn.ModuleDict()
        channels = img_channels + 1
        for level, width in enumerate(block_channels):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(channels, width, kernel=[3, 3])
                channels = width
            else:
                self.enc[f"{res}x{res}_down"] = block(channels, channels, flavor="enc", resample_mode="down")
            for index in range(num_blocks):
                self.enc[f"{res}x{res}_block{index}"] = block(channels, width, flavor="enc",
                                                              attention=res in attn_resolutions)
                channels = width

        # Decoder: two middle blocks (the first with attention) at the lowest resolution, an upsampling block
        # above it, then num_blocks + 1 blocks per level, each consuming one encoder activation.
        self.dec = nn.ModuleDict()
        skips = [layer.out_channels for layer in self.enc.values()]
        self._takes_skip: set[str] = set()
        for level, width in reversed(list(enumerate(block_channels))):
            res = img_resolution >> level
            if level == len(block_channels) - 1:
                self.dec[f"{res}x{res}_in0"] = block(channels, channels, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(channels, channels, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(channels, channels, flavor="dec", resample_mode="up")
            for index in range(num_blocks + 1):
                name = f"{res}x{res}_block{index}"
                self.dec[name] = block(channels + skips.pop(), width, flavor="dec",
                                       attention=res in attn_resolutions)
                self._takes_skip.add(name)
                channels = width
        self.out_conv = MPConv(channels, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None
                ) -> torch.Tensor:
        # Embedding.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, MPConv) else layer(x, emb)
            skips.append(x)

        # Decoder.
        for name, layer in self.dec.items():
            if name in self._takes_skip:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(nn.Module):
    """EDM2's denoiser D(x; σ) = c_skip x + c_out F(c_in x; ln(σ)/4) (EDM Table 1 with σ_d) around `unet`,
    plus the uncertainty head log u(σ) = logvar_linear(logvar_fourier(c_noise)) that EDM2's loss weights
    with (paper Eq. 21); PID never uses the head.

    With `use_fp16` the U-Net runs in float16 on CUDA. Inputs are cast to float32, or to float64 for a float64
    network (whose every step then runs in float64); `class_labels=None` on a conditional network means zeros
    (no class).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs: Any):
        init_kwargs = _constructor_arguments(locals(), var_keyword="unet_kwargs")
        super().__init__()
        self.init_kwargs = init_kwargs
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def preconditioning(self, sigma: torch.Tensor) -> Preconditioning:
        """c_skip, c_out, c_in, c_noise at σ, in σ's dtype and shape."""
        sigma_data = self.sigma_data
        return Preconditioning(
            c_skip=sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2),
            c_out=sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt(),
            c_in=1 / (sigma_data ** 2 + sigma ** 2).sqrt(),
            c_noise=sigma.log() / 4)

    def labels(self, class_labels: torch.Tensor | None, device: torch.device, dtype: torch.dtype
               ) -> torch.Tensor | None:
        """Labels as the U-Net takes them: None when unconditional, zeros [1, label_dim] when not given."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device, dtype=dtype)
        return class_labels.to(dtype).reshape(-1, self.label_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, return_logvar: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        dtype = _working_dtype(self.logvar_linear.weight.dtype)
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1, 1, 1, 1)
        class_labels = self.labels(class_labels, x.device, dtype)
        unet_dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else dtype

        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        c_noise = c_noise.flatten()
        F_x = self.unet((c_in * x).to(unet_dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(dtype)
        if return_logvar:
            return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """EDM2's denoiser accepts any σ: no rounding."""
        return torch.as_tensor(sigma)


# ----------------------------------------------------------------------------------------------------------
# The released configurations (train_edm2.py's presets; shapes from the data sets).

EDM2_RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
_MODEL_CHANNELS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
_DROPOUT = {"xs": 0.0, "s": 0.0, "m": 0.1, "l": 0.1, "xl": 0.1, "xxl": 0.1}
_DATA = {"img512": dict(img_resolution=64, img_channels=4), "img64": dict(img_resolution=64, img_channels=3)}


def _preset(data: str, size: str, label_dim: int = 1000) -> dict[str, Any]:
    """Precond arguments as train_edm2.py records them: the data's shape, model_channels, dropout, fp16."""
    return dict(**_DATA[data], label_dim=label_dim, model_channels=_MODEL_CHANNELS[size], dropout=_DROPOUT[size],
                use_fp16=True)


EDM2_PRESETS: dict[str, dict[str, Any]] = {
    **{f"edm2-img512-{size}": _preset("img512", size) for size in ("xs", "s", "m", "l", "xl", "xxl")},
    **{f"edm2-img512-{size}-uncond": _preset("img512", size, label_dim=0) for size in ("xs", "s")},
    **{f"edm2-img64-{size}": _preset("img64", size) for size in ("xs", "s", "m", "l", "xl")},
}



def release_preset(name: str) -> str | None:
    """The architecture preset of a release file name `<preset>-<kimg>-<ema std>[.pkl|.pt]` (e.g.
    `edm2-img512-s-2147483-0.070.pkl` → `edm2-img512-s`), or None when the name is not of that form."""
    match = re.fullmatch(r"(edm2-[a-z0-9-]+?)-\d{7}-\d\.\d{3}(\.pkl|\.pt)?", name.rsplit("/", 1)[-1])
    return match.group(1) if match and match.group(1) in EDM2_PRESETS else None
