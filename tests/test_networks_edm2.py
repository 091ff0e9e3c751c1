"""EDM2 networks against NVlabs/edm2's own outputs (tests/fixtures/edm2), its key lists, and AD checks."""

import functools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from pid_diffusion.networks import edm2
from pid_diffusion.networks.edm2 import EDM2_PRESETS, MPConv, MPFourier, Block, Precond

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "edm2"
# Tolerances the fixtures' README states for a faithful float32 implementation; float64 within 1e-10.
PRIMITIVE_TOL = dict(rtol=1e-5, atol=2e-6)
PRECOND_TOL = dict(rtol=1e-5, atol=2e-5)
FP64_TOL = dict(rtol=0, atol=1e-10)
KEY_FILES = sorted(path.name for path in FIXTURES.glob("edm2_keys_*.txt"))


@functools.cache
def _load(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


def _state(state_dict: dict, dtype: torch.dtype = torch.float32) -> dict:
    return {key: value.to(dtype) for key, value in state_dict.items()}


def _precond(name: str, dtype: torch.dtype = torch.float32) -> tuple[Precond, dict]:
    ref = _load(name)
    net = Precond(**ref["precond_kwargs"]).to(dtype)
    net.load_state_dict(_state(ref["state_dict"], dtype), strict=True)
    return net.eval(), ref


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


# ----------------------------------------------------------------------------------------------------------
# Primitives and layers.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functions_match_edm2(dtype):
    ref = _load("ref_mp_blocks.pt")["functions"]
    suffix, tol = ("y_fp32", PRIMITIVE_TOL) if dtype == torch.float32 else ("y_fp64", FP64_TOL)
    for case in ref["normalize"].values():
        _close(edm2.normalize(case["x"].to(dtype), dim=case["dim"], eps=case["eps"]), case[suffix], tol)
    _close(edm2.mp_silu(ref["mp_silu"]["x"].to(dtype)), ref["mp_silu"][suffix], tol)
    for case in ref["mp_sum"].values():
        _close(edm2.mp_sum(case["a"].to(dtype), case["b"].to(dtype), case["t"]), case[suffix], tol)
    for case in ref["mp_cat"].values():
        _close(edm2.mp_cat(case["a"].to(dtype), case["b"].to(dtype), dim=case["dim"], t=case["t"]), case[suffix], tol)
    for case in ref["resample"].values():
        _close(edm2.resample(case["x"].to(dtype), f=case["f"], mode=case["mode"]), case[suffix], tol)


def test_mpfourier_matches_edm2():
    case = _load("ref_mp_blocks.pt")["mpfourier"]["nc16_bw1"]
    layer = MPFourier(**case["init_kwargs"])
    layer.load_state_dict(_state(case["state_dict"]))
    _close(layer(case["x"]), case["y_fp32"], PRIMITIVE_TOL)
    _close(layer.double()(case["x"].double()), case["y_fp64"], FP64_TOL)
    layer.load_state_dict(_state(case["state_dict"], torch.float16))
    _close(layer.float().half()(case["x"]), case["y_fp32_with_fp16_buffers"], PRIMITIVE_TOL)


@pytest.mark.parametrize("name", ["k1x1", "k3x3", "linear"])
def test_mpconv_matches_edm2_eval_and_train(name):
    case = _load("ref_mp_blocks.pt")["mpconv"][name]

    def gains(dtype):  # the tensor gain (as emb_gain is one) in the network's dtype, as EDM2's runs passed it
        return [torch.tensor(g, dtype=dtype) if is_tensor else g
                for g, is_tensor in zip(case["gains"], case["gain_is_tensor"])]

    def layer(dtype=torch.float32):
        conv = MPConv(*case["init_args"], **case["init_kwargs"]).to(dtype)
        conv.load_state_dict(_state(case["state_dict"], dtype))
        return conv

    conv = layer().eval()
    for gain, y32 in zip(gains(torch.float32), case["y_eval_fp32"]):
        _close(conv(case["x"], gain=gain), y32, PRIMITIVE_TOL)
    conv64 = layer(torch.float64).eval()
    for gain, y64 in zip(gains(torch.float64), case["y_eval_fp64"]):
        _close(conv64(case["x"].double(), gain=gain), y64, FP64_TOL)
    half = layer()
    half.weight.data = half.weight.data.half()
    _close(half.eval()(case["x"], gain=0.7), case["y_eval_fp32_fp16_weight"], PRIMITIVE_TOL)

    # Train mode: forced weight normalisation rewrites the weight, and the output uses the rewritten one.
    conv = layer().train()
    _close(conv(case["x"], gain=case["train_gain"]), case["y_train_fp32"], PRIMITIVE_TOL)
    _close(conv.weight.detach(), case["weight_after_train_fp32"], PRIMITIVE_TOL)
    _close(conv(case["x"], gain=case["train_gain"]), case["y_train_twice_fp32"], PRIMITIVE_TOL)
    _close(conv.weight.detach(), case["weight_after_train_twice_fp32"], PRIMITIVE_TOL)
    conv64 = layer(torch.float64).train()
    _close(conv64(case["x"].double(), gain=case["train_gain"]), case["y_train_fp64"], FP64_TOL)
    _close(conv64.weight.detach(), case["weight_after_train_fp64"], FP64_TOL)


BLOCKS = ["enc_keep", "enc_down", "dec_up", "dec_keep_attn_h2", "enc_chg_skip", "dec_chg_skip_attn_h2",
          "enc_keep_clip"]


@pytest.mark.parametrize("name", BLOCKS)
def test_block_matches_edm2(name):
    case = _load("ref_mp_blocks.pt")["blocks"][name]

    def block(dtype=torch.float32):
        layer = Block(**case["init_kwargs"]).to(dtype)
        layer.load_state_dict(_state(case["state_dict"], dtype))
        return layer

    assert block().num_heads == case["num_heads"]
    x, emb = case["x"], case["emb"]
    with torch.no_grad():
        _close(block().eval()(x, emb), case["y_eval_fp32"], PRIMITIVE_TOL)
        _close(block(torch.float64).eval()(x.double(), emb.double()), case["y_eval_fp64"], FP64_TOL)
        assert case["train_is_deterministic"]
        trained = block().train()
        _close(trained(x, emb), case["y_train_fp32"], PRIMITIVE_TOL)
        for key, value in trained.state_dict().items():
            _close(value, case["weights_after_train_fp32"][key], PRIMITIVE_TOL)
        _close(block(torch.float64).train()(x.double(), emb.double()), case["y_train_fp64"], FP64_TOL)


# ----------------------------------------------------------------------------------------------------------
# Whole networks.

NETWORKS = ["ref_edm2_uncond.pt", "ref_edm2_cond.pt"]


def _heads(net: Precond) -> dict[str, int]:
    return {f"{section}.{name}": block.num_heads for section in ("enc", "dec")
            for name, block in getattr(net.unet, section).items() if isinstance(block, Block) and block.num_heads}


@pytest.mark.parametrize("name", NETWORKS)
def test_precond_layout_matches_edm2(name):
    net, ref = _precond(name)
    assert list(net.state_dict()) == ref["state_dict_keys"] == list(ref["state_dict"])
    assert sum(p.numel() for p in net.parameters()) == ref["num_params"]
    assert _heads(net) == {key: value for key, value in ref["attention_heads"].items() if value}
    assert net.init_kwargs == ref["init_kwargs"]


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_precond_eval_matches_edm2(name, dtype):
    net, ref = _precond(name, dtype)
    suffix = "fp32" if dtype == torch.float32 else "fp64"
    tol = PRECOND_TOL if dtype == torch.float32 else FP64_TOL
    x, sigma, labels = ref["x"].to(dtype), ref["sigma"].to(dtype), ref["class_labels"]
    D, logvar = net(x, sigma, labels, return_logvar=True)
    _close(D, ref[f"D_{suffix}"], tol)
    _close(logvar, ref[f"logvar_{suffix}"], tol)
    D, logvar = net(x, ref["sigma_scalar"].to(dtype), labels, return_logvar=True)
    _close(D, ref[f"D_{suffix}_scalar_sigma"], tol)
    _close(logvar, ref[f"logvar_{suffix}_scalar_sigma"], tol)
    if labels is not None:
        _close(net(x, sigma), ref[f"D_{suffix}_nolabels"], tol)
    unet_labels = ref["unet_class_labels"]
    F_x = net.unet(ref["unet_x"].to(dtype), ref["unet_noise_labels"].to(dtype),
                   None if unet_labels is None else unet_labels.to(dtype))
    _close(F_x, ref[f"F_{suffix}"], tol)
    if dtype == torch.float32:
        c = net.preconditioning(sigma.reshape(-1, 1, 1, 1))
        for key in ("c_skip", "c_out", "c_in"):
            _close(getattr(c, key).reshape(ref[key].shape), ref[key], PRIMITIVE_TOL)
        _close(c.c_noise.flatten(), ref["c_noise"], PRIMITIVE_TOL)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precond_train_mode_matches_edm2(name, dtype):
    """One train-mode forward (as EDM2's loss makes it): outputs, and every weight after forced normalisation."""
    net, ref = _precond(name, dtype)
    suffix = "fp32" if dtype == torch.float32 else "fp64"
    tol = PRECOND_TOL if dtype == torch.float32 else FP64_TOL
    assert ref["train_is_deterministic"]
    D, logvar = net.train()(ref["x"].to(dtype), ref["sigma"].to(dtype), ref["class_labels"], return_logvar=True)
    _close(D, ref[f"D_train_{suffix}"], tol)
    _close(logvar, ref[f"logvar_train_{suffix}"], tol)
    state = net.state_dict()
    for key, value in ref[f"weights_after_train_{suffix}"].items():
        _close(state[key], value, PRIMITIVE_TOL if dtype == torch.float32 else FP64_TOL)
    for key, (total, squares, peak) in ref[f"weights_after_train_stats_{suffix}"].items():
        value = state[key].double()
        stats = torch.stack([value.sum(), value.square().sum(), value.abs().max()])
        torch.testing.assert_close(stats, torch.tensor([total, squares, peak], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------------------------------------
# The released architectures: key lists and parameter counts.

def _read_keys(path: Path) -> tuple[int, dict, dict[str, int], dict[str, list[int]]]:
    lines = path.read_text().splitlines()
    count = int(re.match(r"# (\d+) parameters", lines[0]).group(1))
    kwargs = json.loads(re.search(r"Precond\(\*\*(\{.*\})\)", lines[1]).group(1))
    heads = json.loads(lines[2].split(":", 1)[1])
    shapes = {key: json.loads(shape) for key, shape in (line.split("\t") for line in lines[4:] if line)}
    return count, kwargs, heads, shapes


@pytest.mark.parametrize("key_file", KEY_FILES)
def test_release_presets_match_edm2_key_lists(key_file):
    preset = key_file.removeprefix("edm2_keys_").removesuffix(".txt")
    count, kwargs, heads, shapes = _read_keys(FIXTURES / key_file)
    assert EDM2_PRESETS[preset] == kwargs
    with torch.device("meta"):
        net = Precond(**EDM2_PRESETS[preset])
    assert {key: list(value.shape) for key, value in net.state_dict().items()} == shapes
    assert list(net.state_dict()) == list(shapes)
    assert sum(p.numel() for p in net.parameters()) == count
    assert _heads(net) == heads


# The presets without a key file: counted here on the meta device. They agree with the sizes EDM2 measured
# (img512 m 497.8 M, l 777.5 M, xl 1,119.3 M), and each img64 net has 3,072 + 1,152·k fewer input and output
# weights than its img512 twin (one image channel less at both ends).
PARAMETER_COUNTS = {
    "edm2-img512-m": 497_807_781, "edm2-img512-l": 777_498_085, "edm2-img512-xl": 1_119_283_749,
    "edm2-img512-s-uncond": 279_444_837, "edm2-img64-xs": 124_710_949, "edm2-img64-m": 497_803_173,
    "edm2-img64-l": 777_492_325, "edm2-img64-xl": 1_119_276_837,
}


@pytest.mark.parametrize("preset", sorted(PARAMETER_COUNTS))
def test_release_parameter_counts(preset):
    with torch.device("meta"):
        net = Precond(**EDM2_PRESETS[preset])
    assert sum(p.numel() for p in net.parameters()) == PARAMETER_COUNTS[preset]


def test_release_preset_names():
    assert edm2.release_preset("edm2-img512-s-2147483-0.070.pkl") == "edm2-img512-s"
    assert edm2.release_preset("teachers/edm2-img512-xs-uncond-2147483-0.025.pt") == "edm2-img512-xs-uncond"
    assert edm2.release_preset("edm2-img512-xs-uncond.pkl") is None
    assert edm2.release_preset("edm-cifar10-32x32-uncond-vp.pkl") is None


# ----------------------------------------------------------------------------------------------------------
# Autograd: reverse mode through a forward-mode time tangent (PID's Derivative.JVP).

def test_reverse_through_time_tangent_matches_finite_difference():
    net, ref = _precond("ref_edm2_cond.pt", torch.float64)
    unet = net.unet
    x, labels = ref["x"].double(), ref["class_labels"].double()
    t = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)

    def time_derivative():
        with fwAD.dual_level():
            y = unet(x, fwAD.make_dual(t, torch.ones_like(t)), labels)
            return fwAD.unpack_dual(y)[1]

    step = 1e-6
    with torch.no_grad():
        fd = (unet(x, t + step, labels) - unet(x, t - step, labels)) / (2 * step)
    torch.testing.assert_close(time_derivative(), fd, rtol=1e-5, atol=1e-6)
    # Backward in train mode (the student's), where forced weight normalisation rewrites the weights in place.
    unet.train()
    time_derivative().square().sum().backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) == len(grads)
