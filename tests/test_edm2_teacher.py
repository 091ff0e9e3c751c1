"""EDM2 teachers: EDM2's own snapshot pickle read without its code, converted, loaded beside EDM's through one
call, sampled with EDM2's Heun sampler, and guided (against tests/fixtures/edm2)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import REPO
from pid_diffusion import encoders
from pid_diffusion.edm_pickle import load_edm_pickle, state_dict_of
from pid_diffusion.guidance import GuidedDenoiser
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.networks.edm2 import Precond
from pid_diffusion.samplers import HeunSampler
from pid_diffusion.teacher import TeacherFileError, TeacherFormat, load_teacher, read_teacher_file
from edm2_helpers import SystemCall
from factories import mark_persistent, write_edm_pickle

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "edm2"
SNAPSHOT = FIXTURES / "edm2_tiny_snapshot.pkl"
PRECOND_TOL = dict(rtol=1e-5, atol=2e-5)  # the fixtures' stated tolerance for Precond outputs and samplers
# EDM2 runs its float16 snapshot with the 0-dim gains in float16, so gain/√fan_in is rounded to float16 there
# (a relative 5e-4); the converted float32 teacher computes it in float32. Measured difference in D: 2.0e-4.
FP16_GAIN_ATOL = 3e-4


def _reference_net(name: str) -> Precond:
    ref = torch.load(FIXTURES / name, weights_only=True)
    net = Precond(**ref["precond_kwargs"])
    net.load_state_dict({key: value.float() for key, value in ref["state_dict"].items()})
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def snapshot_ref():
    return torch.load(FIXTURES / "edm2_tiny_snapshot.pt", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# EDM2's snapshot pickle.

def test_snapshot_reads_without_edm2(snapshot_ref):
    with open(SNAPSHOT, "rb") as file:
        data = load_edm_pickle(file)
    assert list(data) == snapshot_ref["top_level_keys"]
    assert data["dataset_kwargs"] == snapshot_ref["dataset_kwargs"]
    state = state_dict_of(data["ema"])
    ema = snapshot_ref["ema"]
    assert list(state) == ema["state_dict_keys"]
    assert {key: list(value.shape) for key, value in state.items()} == ema["state_dict_shapes"]
    assert {str(value.dtype).removeprefix("torch.") for value in state.values()} == set(ema["state_dict_dtypes"])

    # The network as stored (float16 weights, float16 gains and buffers) computes EDM2's outputs exactly.
    net = Precond(**data["ema"].init_kwargs)
    net.load_state_dict({key: value.float() for key, value in state.items()})
    for name, value in net.named_parameters():
        if value.ndim == 0:
            value.data = value.data.half()
    for value in net.buffers():
        value.data = value.data.half()
    inputs = snapshot_ref["inputs"]
    with torch.no_grad():
        D, logvar = net.eval()(inputs["x"], inputs["sigma"], inputs["class_labels"], return_logvar=True)
        torch.testing.assert_close(D, snapshot_ref["D"], **PRECOND_TOL)
        torch.testing.assert_close(logvar, snapshot_ref["logvar"], **PRECOND_TOL)
        torch.testing.assert_close(net(inputs["x"], inputs["sigma"]), snapshot_ref["D_nolabels"], **PRECOND_TOL)


def test_snapshot_loads_as_float32_teacher_with_its_encoder(snapshot_ref):
    teacher = load_teacher(SNAPSHOT)
    assert isinstance(teacher, Precond) and not teacher.training
    assert all(value.dtype == torch.float32 for value in teacher.state_dict().values())
    assert not any(value.requires_grad for value in teacher.parameters())
    encoder = snapshot_ref["encoder"]["state"]
    assert teacher.encoder == {"class_name": "StabilityVAEEncoder", "vae_name": encoder["vae_name"],
                               "scale": encoder["scale"].tolist(), "bias": encoder["bias"].tolist()}
    inputs = snapshot_ref["inputs"]
    with torch.no_grad():
        D = teacher(inputs["x"], inputs["sigma"], inputs["class_labels"])
    torch.testing.assert_close(D, snapshot_ref["D"], rtol=0, atol=FP16_GAIN_ATOL)
    assert (D - snapshot_ref["D"]).abs().max() > 0  # the float16 rounding of the gains is really gone


@pytest.mark.slow  # starts pid-convert-edm
def test_convert_command_writes_a_weights_only_teacher(tmp_path, snapshot_ref):
    dst = tmp_path / "edm2-tiny.pt"
    result = _run("pid_diffusion.cli.convert_edm", str(SNAPSHOT), str(dst))
    assert result.returncode == 0, result.stderr
    assert "Precond" in result.stdout
    payload = torch.load(dst, weights_only=True)
    assert payload["class_name"] == "Precond"
    assert payload["encoder"]["class_name"] == "StabilityVAEEncoder"
    assert payload["network_kwargs"] == snapshot_ref["ema"]["init_kwargs"]
    assert {value.dtype for value in payload["state_dict"].values()} == {torch.float32}
    converted = read_teacher_file(dst)
    assert converted.source_format is TeacherFormat.CONVERTED and converted.class_name == "Precond"
    inputs = snapshot_ref["inputs"]
    with torch.no_grad():
        assert torch.equal(load_teacher(dst)(inputs["x"], inputs["sigma"], inputs["class_labels"]),
                           load_teacher(SNAPSHOT)(inputs["x"], inputs["sigma"], inputs["class_labels"]))


def test_both_families_load_through_one_call():
    edm_teacher = load_teacher(REPO / "model_zoo" / "edm-shapes-16x16.pt")
    edm2_teacher = load_teacher(SNAPSHOT)
    assert isinstance(edm_teacher, EDMPrecond) and edm_teacher.encoder is None
    assert isinstance(edm2_teacher, Precond) and encoders.is_latent(edm2_teacher.encoder)


def _edm2_layout(**entries) -> dict:
    net = Precond(img_resolution=8, img_channels=4, label_dim=0, model_channels=8, channel_mult=[1],
                  num_blocks=1, attn_resolutions=[], use_fp16=False)
    return dict(ema=mark_persistent(net, net.init_kwargs), **entries)


def test_foreign_global_in_edm2_file_is_refused_by_name(tmp_path):
    marker = tmp_path / "ran"
    pkl = write_edm_pickle(tmp_path / "evil.pkl", _edm2_layout(encoder=SystemCall(f"touch {marker}")))
    with pytest.raises(TeacherFileError) as error:
        load_teacher(pkl)
    assert f"{os.system.__module__}.{os.system.__name__}" in str(error.value)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    pkl = write_edm_pickle(tmp_path / "objects.pkl", _edm2_layout(encoder=np.array([print], dtype=object)))
    with pytest.raises(TeacherFileError, match="refusing NumPy dtype object"):
        load_teacher(pkl)


def test_unknown_encoder_is_refused(tmp_path):
    class VQEncoder(torch.nn.Module):
        pass

    pkl = write_edm_pickle(tmp_path / "vq.pkl", _edm2_layout(encoder=mark_persistent(VQEncoder(), {})))
    with pytest.raises(TeacherFileError, match="encoder is a VQEncoder; EDM2 teachers use"):
        load_teacher(pkl)


def _run(module: str, *args: str):
    import subprocess
    import sys
    from launch import subprocess_env
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------------------
# EDM2's sampler and guidance.

@pytest.mark.parametrize("case", ["cond_32steps", "cond_guided_1.4_32steps"])
def test_heun_sampler_matches_edm2(case):
    ref = torch.load(FIXTURES / "ref_edm2_sampler.pt", weights_only=True)["cases"][case]
    net = _reference_net(ref["net_file"])
    guidance = ref["sampler_kwargs"].get("guidance", 1)
    if guidance != 1:
        net = GuidedDenoiser(net, _reference_net(ref["gnet_file"]), guidance)
    sampler = HeunSampler(num_steps=ref["sampler_kwargs"]["num_steps"])
    assert sampler.num_network_calls == ref["num_net_calls"]
    x = sampler(net, ref["noise"], ref["class_labels"])
    torch.testing.assert_close(x, ref["x_final"], **PRECOND_TOL)
    torch.testing.assert_close(x.double(), ref["x_final_fp64"], **PRECOND_TOL)


def test_guided_denoiser_is_edm2s_lerp():
    ref = torch.load(FIXTURES / "ref_edm2_sampler.pt", weights_only=True)["cases"]["cond_guided_1.4_32steps"]
    net, guide = _reference_net(ref["net_file"]), _reference_net(ref["gnet_file"])
    guided = GuidedDenoiser(net, guide, ref["sampler_kwargs"]["guidance"])
    sigmas = torch.tensor([ref["sigma_per_net_call"][i] for i in ref["probe_call_indices"]])
    with torch.no_grad():
        for probe, sigma in enumerate(sigmas):
            x = ref["x_at_probe_calls"][probe]
            torch.testing.assert_close(net(x, sigma, ref["class_labels"]), ref["net_out_at_probe_calls"][probe],
                                       **PRECOND_TOL)
            torch.testing.assert_close(guide(x, sigma, ref["class_labels"]), ref["gnet_out_at_probe_calls"][probe],
                                       **PRECOND_TOL)
            expected = ref["gnet_out_at_probe_calls"][probe].lerp(ref["net_out_at_probe_calls"][probe], 1.4)
            torch.testing.assert_close(guided(x, sigma, ref["class_labels"]), expected, **PRECOND_TOL)
    assert torch.equal(GuidedDenoiser(net, guide, 1.0)(x, sigma, ref["class_labels"]), net(x, sigma, ref["class_labels"]))
    with pytest.raises(ValueError, match="same space"):
        GuidedDenoiser(net, Precond(img_resolution=8, img_channels=4, label_dim=0, model_channels=8,
                                    channel_mult=[1], num_blocks=1, attn_resolutions=[]), 2.0)


# ----------------------------------------------------------------------------------------------------------
# The distillation presets name EDM2's release files.

def test_edm2_presets_name_edm2_releases():
    from pid_diffusion.distill import release_url, resolve, vae_name
    from pid_diffusion.distances import Metric
    from pid_diffusion.networks.edm2 import EDM2_RELEASE_URL, release_preset
    xs, s, img64 = resolve("edm2-img512-xs"), resolve("edm2-img512-s"), resolve("edm2-img64-s")
    assert release_preset(xs.teacher.path) == "edm2-img512-xs" and xs.pid.metric is Metric.PSEUDO_HUBER
    assert release_preset(s.teacher.path) == "edm2-img512-s" and release_preset(s.teacher.guide_path) == "edm2-img512-xs"
    assert s.teacher.guidance == 2.1 and s.pid.metric is Metric.PSEUDO_HUBER
    assert release_preset(img64.teacher.path) == "edm2-img64-s" and img64.pid.metric is Metric.LPIPS_PIQ
    assert release_url(s.teacher.guide_path) == f"{EDM2_RELEASE_URL}edm2-img512-xs-0134217-0.125.pkl"
    assert vae_name(s) == encoders.SD_VAE and vae_name(img64) is None
