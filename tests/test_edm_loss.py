"""EDMObjective: EDM's σ distribution, its weighting, closed-form losses, labels and determinism."""

import pytest
import torch

from pid_diffusion.edm_loss import EDMObjective
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.toydata import ShapesSpec, make_shapes

from factories import TINY_SONG_UNET

EDM = dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)  # EDM's training defaults (Karras et al. 2022, Table 1)


@pytest.fixture(scope="module")
def data():
    return make_shapes(ShapesSpec(num_images=32, seed=1))


def tiny_precond(label_dim=0):
    return EDMPrecond(**{**TINY_SONG_UNET, "img_resolution": 16, "model_channels": 16, "attn_resolutions": []},
                      label_dim=label_dim)


def test_sample_batch_is_deterministic_and_log_normal(data):
    objective = EDMObjective(data, **EDM)
    a = objective.sample_batch(torch.Generator().manual_seed(7), 8)
    b = objective.sample_batch(torch.Generator().manual_seed(7), 8)
    assert a.keys() == {"images", "sigma", "noise"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_sigma = objective.sample_batch(torch.Generator().manual_seed(0), 20_000)["sigma"].log()
    # Standard errors at n = 20 000: 0.0085 for the mean, 0.006 for the standard deviation.
    assert log_sigma.mean().item() == pytest.approx(EDM["P_mean"], abs=0.04)
    assert log_sigma.std().item() == pytest.approx(EDM["P_std"], abs=0.03)


def test_weight_is_edm_lambda():
    objective = EDMObjective(make_shapes(ShapesSpec(num_images=1)), **EDM)
    sigma = torch.tensor([0.002, 0.5, 80.0])
    # λ(σ) = 1 / c_out(σ)²: the network's target then has unit variance (EDM Eq. 8 and Table 1).
    c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
    torch.testing.assert_close(objective.weight(sigma), 1 / c_out ** 2)


def test_loss_of_identity_denoiser_is_weighted_noise_energy(data):
    objective = EDMObjective(data, **EDM)
    batch = objective.sample_batch(torch.Generator().manual_seed(3), 6)
    loss = objective(lambda x, sigma, labels: x, batch)
    sigma = batch["sigma"]
    expected = objective.weight(sigma) * sigma ** 2 * batch["noise"].square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)


def test_loss_of_exact_denoiser_is_zero():
    one_image = make_shapes(ShapesSpec(num_images=1, seed=5))
    objective = EDMObjective(one_image, **EDM)
    batch = objective.sample_batch(torch.Generator().manual_seed(0), 4)
    target = one_image.batch(torch.tensor([0]))[0]
    loss = objective(lambda x, sigma, labels: target.expand_as(x), batch)  # one data point: D ≡ that point
    assert torch.equal(loss, torch.zeros(4))


def test_loss_through_edm_precond_with_zero_output_layer(data):
    # With F ≡ 0, D(x; σ) = c_skip(σ) x: the closed form checks that σ reaches the preconditioner per sample.
    net = tiny_precond()
    for name, parameter in net.named_parameters():
        if "aux_conv" in name:
            torch.nn.init.zeros_(parameter)
    objective = EDMObjective(data, **EDM)
    batch = objective.sample_batch(torch.Generator().manual_seed(4), 5)
    sigma = batch["sigma"][:, None, None, None]
    noisy = batch["images"] + sigma * batch["noise"]
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    expected = objective.weight(batch["sigma"]) * (c_skip * noisy - batch["images"]).square().mean(dim=(1, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(objective(net, batch), expected)


def test_conditional_batches_carry_one_hot_dataset_labels(data):
    objective = EDMObjective(data, **EDM, label_dim=data.num_classes)
    generator = torch.Generator().manual_seed(2)
    batch = objective.sample_batch(generator, 16)
    indices = torch.randint(len(data), [16], generator=torch.Generator().manual_seed(2))
    assert torch.equal(batch["class_labels"].argmax(1), data.labels[indices])
    assert torch.equal(batch["class_labels"].sum(1), torch.ones(16))
    with torch.no_grad():
        assert objective(tiny_precond(label_dim=data.num_classes), batch).shape == (16,)


@pytest.mark.parametrize("bad, match", [(dict(P_std=0.0), "P_std"), (dict(sigma_data=-1.0), "sigma_data"),
                                        (dict(label_dim=3), "label_dim")])
def test_bad_options_are_rejected(data, bad, match):
    with pytest.raises(ValueError, match=match):
        EDMObjective(data, **{**EDM, **bad})
