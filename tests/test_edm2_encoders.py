"""EDM2's encoders against EDM2's own outputs (ref_vae_tiny.pt): the tiny VAE read from a Hugging Face cache."""

import pytest
import torch

from edm2_helpers import install_tiny_vae, sd_vae_description, vae_reference
from pid_diffusion import encoders

pytest.importorskip("diffusers", reason=encoders.DIFFUSERS_MISSING)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = install_tiny_vae(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_whitening_constants_are_edm2s():
    ref = vae_reference()
    defaults = ref["encoder_defaults"]
    scale, bias = encoders.StabilityVAEEncoder.whitening(defaults["raw_mean"], defaults["raw_std"],
                                                         defaults["final_mean"], defaults["final_std"])
    assert torch.equal(torch.tensor(scale), ref["scale"]) and torch.equal(torch.tensor(bias), ref["bias"])
    assert torch.equal(ref["scale"], ref["sd_vae_ft_mse_scale"])


def test_stability_vae_encoder_matches_edm2(hf_cache):
    ref = vae_reference()
    encoder = encoders.build(sd_vae_description())
    assert sum(p.numel() for p in encoder.vae.parameters()) == ref["vae_num_params"]
    tol = dict(rtol=1e-5, atol=2e-6)
    with torch.no_grad():
        mean_std = encoder.encode_pixels(ref["images_uint8"])
        torch.testing.assert_close(mean_std, ref["encode_pixels_out"], **tol)
        generator = torch.Generator().manual_seed(1407)
        torch.testing.assert_close(encoder.encode_latents(ref["encode_pixels_out"], generator),
                                   ref["encode_latents_out"], **tol)
        assert torch.equal(encoder.decode(ref["decode_in"]), ref["decode_out_uint8"])
        assert torch.equal(encoder.decode(ref["decode_other_in"]), ref["decode_other_out_uint8"])


def test_standard_rgb_encoder_matches_edm2():
    ref = vae_reference()["standard_rgb"]
    encoder = encoders.build({"class_name": encoders.STANDARD_RGB})
    torch.testing.assert_close(encoder.encode(ref["images_uint8"]), ref["encode_out"], rtol=0, atol=0)
    assert torch.equal(encoder.decode(ref["latents"]), ref["decode_out_uint8"])


def test_missing_vae_names_files_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(encoders.MissingVAEError) as error:
        encoders.build(sd_vae_description())
    message = str(error.value)
    for expected in ("stabilityai/sd-vae-ft-mse", *encoders.VAE_FILES, str(tmp_path / "empty"),
                     "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/config.json",
                     "pid-fetch-weights"):
        assert expected in message
