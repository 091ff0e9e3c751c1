"""EDM networks against NVlabs/edm's own outputs (fixtures), EDM's key lists, closed forms and AD checks."""

import functools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pid_diffusion.networks import edm2
from pid_diffusion.networks.edm import (
    EDM_PRESETS, Conv2d, DhariwalUNet, EDMPrecond, Init, PositionalEmbedding, SongUNet, UNetBlock,
)

NETWORK_FIXTURES = ["ref_song_uncond.pt", "ref_song_cond.pt", "ref_dhariwal_cond.pt"]
FP32_ATOL = 1e-5  # Tolerances stated by the fixtures' README.
FP64_ATOL = 1e-6


@functools.cache
def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _reference_precond(fixtures_dir: Path, name: str) -> tuple[EDMPrecond, dict]:
    ref = _load(fixtures_dir / name)
    precond = EDMPrecond(**ref["precond_kwargs"])
    precond.load_state_dict(ref["state_dict"], strict=True)
    return precond.eval(), ref


def _recorder(store: dict, key: str, pick=lambda out: out):
    """A forward hook storing `pick(output)` under `key` (and returning None, which keeps the output)."""
    def hook(module, args, out):
        store.setdefault(key, pick(out))
    return hook


def _attention_heads(model: torch.nn.Module) -> dict[str, int]:
    """Attention heads of every U-Net block, keyed like EDM's fixtures ("enc.8x8_block0")."""
    return {f"{section}.{name}": block.num_heads for section in ("enc", "dec")
            for name, block in getattr(model, section).items() if isinstance(block, UNetBlock)}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    return (a - b).abs().max().item()


def _denoise_fp64(precond: EDMPrecond, ref: dict, augment_labels: torch.Tensor | None) -> torch.Tensor:
    """D(x; σ) entirely in float64: the inner network on `precond.double()` and the Table 1 formulas."""
    sigma = ref["sigma"].double().reshape(-1, 1, 1, 1)
    labels = None if ref["class_labels"] is None else ref["class_labels"].double()
    aug = None if augment_labels is None else augment_labels.double()
    c = precond.preconditioning(sigma)
    F_x = precond.model(c.c_in * ref["x"].double(), c.c_noise.flatten(), labels, augment_labels=aug)
    return c.c_skip * ref["x"].double() + c.c_out * F_x


# ----------------------------------------------------------------------------------------------------------
# Whole networks against EDM.

@pytest.mark.parametrize("name", NETWORK_FIXTURES)
def test_state_dict_layout_matches_edm(edm_fixtures_dir, name):
    precond, ref = _reference_precond(edm_fixtures_dir, name)
    ours = precond.state_dict()
    assert list(ours) == list(ref["state_dict"])
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref["state_dict"].items()}
    assert sum(p.numel() for p in precond.parameters()) == ref["num_params"]
    assert _attention_heads(precond.model) == ref["attention_heads"]


@pytest.mark.parametrize("name", NETWORK_FIXTURES)
@torch.no_grad()
def test_denoiser_fp32_matches_edm(edm_fixtures_dir, name):
    precond, ref = _reference_precond(edm_fixtures_dir, name)
    x, sigma, labels, aug = ref["x"], ref["sigma"], ref["class_labels"], ref["augment_labels"]
    outputs = {"D_fp32": precond(x, sigma, labels), "D_fp32_scalar_sigma": precond(x, ref["sigma_scalar"], labels)}
    if aug is not None:
        outputs["D_fp32_aug"] = precond(x, sigma, labels, augment_labels=aug)
    if labels is not None:
        outputs["D_fp32_nolabels"] = precond(x, sigma)
    c = precond.preconditioning(sigma.reshape(-1, 1, 1, 1))
    outputs["F_fp32"] = precond.model(c.c_in * x, c.c_noise.flatten(), labels)
    outputs.update({key: value.flatten() for key, value in c._asdict().items()})
    for key, value in outputs.items():
        assert _max_diff(value, ref[key]) <= FP32_ATOL, key


@pytest.mark.parametrize("name", NETWORK_FIXTURES)
@torch.no_grad()
def test_denoiser_fp64_matches_edm(edm_fixtures_dir, name):
    precond, ref = _reference_precond(edm_fixtures_dir, name)
    precond.double()
    # The wrapper itself casts to float32 like EDM's, so a float64 network still returns EDM's D_fp32.
    D = precond(ref["x"].double(), ref["sigma"].double(), ref["class_labels"])
    assert str(D.dtype) == ref["check_precond_fp64_net_returns_dtype"]
    assert _max_diff(D, ref["D_fp32"]) <= FP32_ATOL

    c = precond.preconditioning(ref["sigma"].double().reshape(-1, 1, 1, 1))
    labels = None if ref["class_labels"] is None else ref["class_labels"].double()
    F_x = precond.model(c.c_in * ref["x"].double(), c.c_noise.flatten(), labels)
    assert _max_diff(F_x, ref["F_fp64"]) <= FP64_ATOL
    assert _max_diff(_denoise_fp64(precond, ref, None), ref["D_fp64"]) <= FP64_ATOL
    if ref["augment_labels"] is not None:
        assert _max_diff(_denoise_fp64(precond, ref, ref["augment_labels"]), ref["D_fp64_aug"]) <= FP64_ATOL


@pytest.mark.parametrize("name", NETWORK_FIXTURES)
@torch.no_grad()
def test_mapping_network_intermediates_match_edm(edm_fixtures_dir, name):
    precond, ref = _reference_precond(edm_fixtures_dir, name)
    model = precond.model
    seen = {}
    for key, layer in [("map_noise_out", model.map_noise), ("map_layer0_out", model.map_layer0),
                       ("map_layer1_out", model.map_layer1)]:
        layer.register_forward_hook(_recorder(seen, key))
    first_block = next(b for b in model.enc.values() if isinstance(b, UNetBlock))

    def record_emb(module, args):
        seen.setdefault("emb_into_blocks", args[1])  # Returns None: a pre-hook's result would replace args.

    first_block.register_forward_pre_hook(record_emb)
    precond(ref["x"], ref["sigma"], ref["class_labels"])
    for key, expected in ref["intermediates_fp32"].items():
        assert _max_diff(seen[key], expected) <= FP32_ATOL, key


# ----------------------------------------------------------------------------------------------------------
# Building blocks against EDM.

def _block_from_edm_kwargs(kwargs: dict) -> UNetBlock:
    """UNetBlock from EDM's keyword arguments (its init dicts become `Init`)."""
    kwargs = dict(kwargs)
    for key in ("init", "init_zero", "init_attn"):
        if key in kwargs:
            edm_init = kwargs[key]
            kwargs[key] = Init(mode=edm_init.get("init_mode", "kaiming_normal"),
                               weight=edm_init.get("init_weight", 1), bias=edm_init.get("init_bias", 0))
    return UNetBlock(**kwargs)


@pytest.mark.parametrize("name", ["adm_attn_h4", "adm_attn_h2_chg", "adm_down", "adm_up", "adm_chg",
                                  "song_attn_chg", "song_down", "song_up", "song_chg"])
@torch.no_grad()
def test_unet_block_matches_edm(edm_fixtures_dir, name):
    ref = _load(edm_fixtures_dir / "ref_blocks.pt")["blocks"][name]
    block = _block_from_edm_kwargs(ref["kwargs"])
    assert list(block.state_dict()) == list(ref["state_dict"])
    block.load_state_dict(ref["state_dict"], strict=True)
    block.eval()
    assert block.num_heads == ref["num_heads"]
    assert _max_diff(block(ref["x"], ref["emb"]), ref["y_fp32"]) <= FP32_ATOL
    block.double()
    assert _max_diff(block(ref["x"].double(), ref["emb"].double()), ref["y_fp64"]) <= FP64_ATOL


def test_positional_embedding_matches_edm(edm_fixtures_dir):
    cases = _load(edm_fixtures_dir / "ref_blocks.pt")["posemb"]
    assert len(cases) == 8
    for name, case in cases.items():
        embed = PositionalEmbedding(case["num_channels"], case["max_positions"], case["endpoint"])
        assert _max_diff(embed(case["c_noise"]), case["out_fp32"]) <= FP32_ATOL, name
        assert _max_diff(embed(case["c_noise"].double()), case["out_fp64"]) <= FP64_ATOL, name


# ----------------------------------------------------------------------------------------------------------
# The official checkpoints' layout.

def _read_key_file(path: Path) -> tuple[dict, int, dict, list[tuple[str, list[int], str]]]:
    """Constructor kwargs, parameter count, attention heads and (key, shape, dtype) rows of an EDM key list."""
    lines = path.read_text().splitlines()
    kwargs = json.loads(re.search(r"EDMPrecond\(\*\*(\{.*\})\)", lines[0]).group(1))
    entries, params = map(int, re.search(r"(\d+) state_dict entries; (\d+) parameters", lines[1]).groups())
    heads = json.loads(lines[2].split(":", 1)[1])
    rows = [(key, json.loads(shape), dtype) for key, shape, dtype in
            (line.split("\t") for line in lines if line and not line.startswith("#"))]
    assert len(rows) == entries
    return kwargs, params, heads, rows


# The releases whose key lists EDM's code wrote into tests/fixtures/edm; the other six are checked against the
# options EDM's train.py gives them (test_release_presets_follow_edms_training_options).
KEY_FILE_PRESETS = ["edm-cifar10-32x32-cond-vp", "edm-cifar10-32x32-uncond-vp", "edm-imagenet-64x64-cond-adm"]


@pytest.mark.parametrize("preset", KEY_FILE_PRESETS)
def test_presets_match_official_checkpoint_layout(edm_fixtures_dir, preset):
    kwargs, num_params, heads, rows = _read_key_file(edm_fixtures_dir / f"edm_keys_{preset}.txt")
    assert EDM_PRESETS[preset] == kwargs
    with torch.device("meta"):  # Shapes only: no memory, no arithmetic.
        precond = EDMPrecond(**EDM_PRESETS[preset])
        resolution, channels = kwargs["img_resolution"], kwargs["img_channels"]
        assert precond(torch.empty(2, channels, resolution, resolution), torch.empty(2)).shape == (
            2, channels, resolution, resolution)
    ours = [(key, list(value.shape), str(value.dtype).removeprefix("torch."))
            for key, value in precond.state_dict().items()]
    assert ours == rows
    assert sum(p.numel() for p in precond.parameters()) == num_params
    assert {name: n for name, n in _attention_heads(precond.model).items() if n} == heads


# EDM's train.py: --arch=ddpmpp and --arch=ncsnpp set these SongUNet options; --augment > 0 sets augment_dim 9.
_EDM_ARCH_OPTIONS = {
    "vp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1]),
    "ve": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
               channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
}
# EDM's README training table: resolution, classes, --cres and --dropout of each release.
_EDM_RELEASES = {
    "edm-cifar10-32x32-cond-ve": (32, 10, [2, 2, 2], 0.13),
    "edm-cifar10-32x32-uncond-ve": (32, 0, [2, 2, 2], 0.13),
    "edm-ffhq-64x64-uncond-vp": (64, 0, [1, 2, 2, 2], 0.05),
    "edm-ffhq-64x64-uncond-ve": (64, 0, [1, 2, 2, 2], 0.05),
    "edm-afhqv2-64x64-uncond-vp": (64, 0, [1, 2, 2, 2], 0.25),
    "edm-afhqv2-64x64-uncond-ve": (64, 0, [1, 2, 2, 2], 0.25),
}


def test_every_release_is_a_preset():
    assert sorted(EDM_PRESETS) == sorted([*KEY_FILE_PRESETS, *_EDM_RELEASES])


@pytest.mark.parametrize("preset", sorted(_EDM_RELEASES))
def test_release_presets_follow_edms_training_options(preset):
    resolution, label_dim, channel_mult, dropout = _EDM_RELEASES[preset]
    expected = dict(img_resolution=resolution, img_channels=3, label_dim=label_dim, use_fp16=False,
                    model_type="SongUNet", **_EDM_ARCH_OPTIONS[preset.rsplit("-", 1)[1]], model_channels=128,
                    channel_mult=channel_mult, augment_dim=9, dropout=dropout)
    assert EDM_PRESETS[preset] == expected
    with torch.device("meta"):
        precond = EDMPrecond(**EDM_PRESETS[preset])
        assert precond(torch.empty(1, 3, resolution, resolution), torch.empty(1)).shape == (1, 3, resolution,
                                                                                            resolution)


# ----------------------------------------------------------------------------------------------------------
# Options without an EDM fixture: shapes, closed forms and round trips.

def test_init_kwargs_are_json_and_rebuild_the_network():
    precond = EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=8,
                         channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), resample_filter=(1, 3, 3, 1))
    assert precond.init_kwargs["channel_mult"] == [1, 2]
    assert precond.init_kwargs["resample_filter"] == [1, 3, 3, 1]
    rebuilt = EDMPrecond(**json.loads(json.dumps(precond.init_kwargs)))
    rebuilt.load_state_dict(precond.state_dict(), strict=True)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0])
    torch.testing.assert_close(rebuilt(x, sigma), precond(x, sigma))
    raw = SongUNet(**precond.model.init_kwargs)
    assert list(raw.state_dict()) == list(precond.model.state_dict())


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="model_type='UNet' is unknown"):
        EDMPrecond(img_resolution=8, img_channels=3, model_type="UNet")
    with pytest.raises(ValueError, match="embedding_type='sinusoidal' is not supported"):
        SongUNet(img_resolution=8, in_channels=3, out_channels=3, embedding_type="sinusoidal")
    with pytest.raises(ValueError, match="cannot be halved"):
        DhariwalUNet(img_resolution=12, in_channels=3, out_channels=3, channel_mult=[1, 1, 1, 1])


@pytest.mark.parametrize("embedding_type, encoder_type, decoder_type, resample_filter", [
    ("positional", "standard", "standard", [1, 1]),  # DDPM++ (EDM's VP networks)
    ("fourier", "residual", "standard", [1, 3, 3, 1]),  # NCSN++ (EDM's VE networks)
    ("positional", "skip", "skip", [1, 3, 3, 1]),
    ("fourier", "skip", "standard", [1, 1]),
    ("positional", "residual", "skip", [1, 1]),
])
def test_song_unet_variants_run(embedding_type, encoder_type, decoder_type, resample_filter):
    torch.manual_seed(0)
    net = SongUNet(img_resolution=8, in_channels=3, out_channels=2, label_dim=3, augment_dim=2, model_channels=8,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], embedding_type=embedding_type,
                   encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=resample_filter)
    y = net(torch.randn(2, 3, 8, 8), torch.randn(2), torch.eye(3)[:2], torch.randn(2, 2))
    assert y.shape == (2, 2, 8, 8) and torch.isfinite(y).all()
    names = list(net.enc) + list(net.dec)
    assert any("aux_skip" in n for n in names) == (encoder_type == "skip")
    assert any("aux_residual" in n for n in names) == (encoder_type == "residual")
    assert sum("aux_conv" in n for n in names) == (3 if decoder_type == "skip" else 1)
    assert ("freqs" in dict(net.map_noise.named_buffers())) == (embedding_type == "fourier")


def test_resampling_closed_forms():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    down = Conv2d(3, 3, kernel=0, down=True).double()
    up = Conv2d(3, 3, kernel=0, up=True).double()
    # A [1, 1] filter is 2×2 average pooling down and nearest-neighbour up.
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"), rtol=0, atol=1e-12)

    # Fused downsampling convolves at full resolution, then averages 2×2 blocks.
    torch.manual_seed(0)
    fused_down = Conv2d(3, 4, kernel=3, down=True, fused_resample=True).double()
    expected = F.avg_pool2d(F.conv2d(x, fused_down.weight, fused_down.bias, padding=1), 2)
    torch.testing.assert_close(fused_down(x), expected, rtol=0, atol=1e-12)
    # Fused upsampling pads the upsampled map instead of the convolution's input: same values inside.
    plain_up = Conv2d(3, 4, kernel=3, up=True, resample_filter=[1, 3, 3, 1]).double()
    fused_up = Conv2d(3, 4, kernel=3, up=True, resample_filter=[1, 3, 3, 1], fused_resample=True).double()
    fused_up.load_state_dict(plain_up.state_dict())
    torch.testing.assert_close(fused_up(x)[..., 1:-1, 1:-1], plain_up(x)[..., 1:-1, 1:-1], rtol=0, atol=1e-12)


def _tiny_networks() -> dict[str, torch.nn.Module]:
    """Small raw networks with attention, float64, for the AD and precision checks."""
    torch.manual_seed(0)
    song = SongUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, model_channels=8,
                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
    # DhariwalUNet has one attention head per 64 channels: 64 channels give attention at 4×4.
    adm = DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, model_channels=64,
                       channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0)
    nets = {"song": song, "adm": adm}
    for net in nets.values():
        with torch.no_grad():  # EDM zero-initialises output layers: randomise them so every path matters.
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return nets


@pytest.mark.parametrize("kind", ["song", "adm"])
def test_jvp_in_noise_labels_matches_reverse_mode_and_finite_difference(kind):
    net = _tiny_networks()[kind].double().train()  # train(): dropout 0 must keep forward AD working.
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.eye(4, dtype=torch.float64)[:2]
    noise_labels = torch.tensor([-0.5, 0.7], dtype=torch.float64)
    y, dy = torch.func.jvp(lambda s: net(x, s, labels), (noise_labels,), (torch.ones_like(noise_labels),))
    torch.testing.assert_close(y, net(x, noise_labels, labels), rtol=0, atol=1e-12)
    assert dy.abs().max() > 1e-2  # The derivative is not trivially zero.

    # Forward and reverse mode agree: <u, J 1> = <J^T u, 1> for any cotangent u.
    u = torch.randn_like(y)
    probe = noise_labels.clone().requires_grad_()
    (vjp,) = torch.autograd.grad((net(x, probe, labels) * u).sum(), probe)
    torch.testing.assert_close((u * dy).sum(), vjp.sum(), rtol=1e-6, atol=0)

    # And both are the derivative. The attention logits are float32 (as in EDM), so the step is not tiny.
    h = 1e-3
    with torch.no_grad():
        fd = (net(x, noise_labels + h, labels) - net(x, noise_labels - h, labels)) / (2 * h)
    assert (dy - fd).abs().max() <= 1e-3 * dy.abs().max()


@pytest.mark.parametrize("kind", ["song", "adm"])
@torch.no_grad()
def test_bfloat16_autocast_is_close_to_float32(kind):
    net = _tiny_networks()[kind].eval()
    x, noise_labels, labels = torch.randn(2, 3, 8, 8), torch.tensor([-0.5, 0.7]), torch.eye(4)[:2]
    reference = net(x, noise_labels, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x, noise_labels, labels)
    assert torch.isfinite(y).all()
    # bfloat16 keeps 8 bits of mantissa: a few percent of the output's scale.
    assert (y.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def test_dropout_reaches_every_block():
    precond = EDMPrecond(img_resolution=8, img_channels=3, model_type="DhariwalUNet", model_channels=8,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.25)
    blocks = [m for m in precond.modules() if isinstance(m, UNetBlock)]
    assert blocks and all(b.dropout == 0.25 for b in blocks)
    with torch.no_grad():
        for p in precond.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    eval_out = precond.eval()(x, sigma)
    torch.testing.assert_close(precond(x, sigma), eval_out, rtol=0, atol=0)
    assert not torch.allclose(precond.train()(x, sigma), eval_out)


@pytest.mark.parametrize("dropout", [1.0, -0.1])
def test_a_dropout_outside_zero_to_one_is_refused_where_the_blocks_are_built(dropout):
    message = re.escape(f"dropout={dropout}: need 0 ≤ dropout < 1")
    with pytest.raises(ValueError, match=message):
        EDMPrecond(img_resolution=8, img_channels=3, model_type="DhariwalUNet", model_channels=8,
                   channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=dropout)
    with pytest.raises(ValueError, match=message):
        edm2.Block(8, 8, emb_channels=8, dropout=dropout)


def test_label_dropout_one_equals_unconditional():
    torch.manual_seed(0)
    net = SongUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, model_channels=8,
                   channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0, label_dropout=1)
    x, noise_labels = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.2])
    dropped = net.train()(x, noise_labels, torch.eye(4)[:2])
    torch.testing.assert_close(dropped, net.eval()(x, noise_labels, torch.zeros(2, 4)), rtol=0, atol=0)


@torch.no_grad()
def test_float16_image_path_keeps_mapping_in_float32(edm_fixtures_dir):
    # What EDMPrecond does on CUDA with use_fp16, run on the raw network (CPU float16 works, slowly).
    precond, ref = _reference_precond(edm_fixtures_dir, "ref_song_cond.pt")
    dtypes = {}
    precond.model.map_layer1.register_forward_hook(_recorder(dtypes, "emb", lambda out: out.dtype))
    c = precond.preconditioning(ref["sigma"].reshape(-1, 1, 1, 1))
    F_x = precond.model((c.c_in * ref["x"]).half(), c.c_noise.flatten(), ref["class_labels"])
    assert F_x.dtype == torch.float16 and dtypes == {"emb": torch.float32}
    assert (F_x.float() - ref["F_fp32"]).abs().max() <= 1e-2 * ref["F_fp32"].abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="use_fp16 takes effect only on CUDA")
@torch.no_grad()
@pytest.mark.parametrize("force_fp32", [False, True])
def test_use_fp16_runs_the_image_path_in_half_precision_on_cuda(edm_fixtures_dir, force_fp32):
    precond, ref = _reference_precond(edm_fixtures_dir, "ref_dhariwal_cond.pt")
    precond = precond.cuda()
    precond.use_fp16 = True
    dtypes = {}
    precond.model.map_layer1.register_forward_hook(_recorder(dtypes, "emb", lambda out: out.dtype))
    precond.model.out_conv.register_forward_hook(_recorder(dtypes, "F", lambda out: out.dtype))
    D = precond(ref["x"].cuda(), ref["sigma"].cuda(), ref["class_labels"].cuda(), force_fp32=force_fp32)
    image_dtype = torch.float32 if force_fp32 else torch.float16
    assert D.dtype == torch.float32 and dtypes == {"emb": torch.float32, "F": image_dtype}
    # Loose: float16 keeps 11 bits, and CUDA may use TF32 convolutions even in float32.
    assert (D.cpu() - ref["D_fp32"]).abs().max() <= 1e-2 * ref["D_fp32"].abs().max()
