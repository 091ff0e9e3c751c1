"""Post-hoc EMA: the power-function EMA and EDM2's reconstruction against EDM2's own outputs (fixtures/edm2/
ref_phema.pt, README-phema.md), the trainer keeping them (stored, resumed bit for bit), and `pid-phema`."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pid_diffusion.training import checkpoint, phema, posthoc_ema
from pid_diffusion.cli import phema as phema_cli
from pid_diffusion.utils import fileio

from equality import assert_same_training_state
from factories import train_toy

REF = torch.load(Path(__file__).parent / "fixtures" / "edm2" / "ref_phema.pt", weights_only=True)
PROFILE_ATOL = 1e-15  # power_function_response: a normalised sum, float64 rounding of another summation order


def _np(value):
    return value.numpy() if torch.is_tensor(value) else np.asarray(value)


# ----------------------------------------------------------------------------------------------------------
# Equal to EDM2.

def test_profile_functions_equal_edm2():
    np.testing.assert_array_equal(phema.exp_to_std(_np(REF["exp_to_std"]["exp"])), _np(REF["exp_to_std"]["std"]))
    np.testing.assert_array_equal(phema.std_to_exp(_np(REF["std_to_exp"]["std"])), _np(REF["std_to_exp"]["exp"]))
    response = REF["power_function_response"]
    np.testing.assert_allclose(phema.power_function_response(_np(response["ofs"]), _np(response["std"]),
                                                             response["len"], response["axis"]),
                               _np(response["resp"]), rtol=0, atol=PROFILE_ATOL)
    corr = REF["power_function_correlation"]
    np.testing.assert_array_equal(phema.power_function_correlation(
        *(_np(corr[key]) for key in ("a_ofs", "a_std", "b_ofs", "b_std"))), _np(corr["corr"]))
    beta = REF["power_function_beta"]
    np.testing.assert_array_equal(phema.power_function_beta(*(_np(beta[key]) for key in ("std", "t_next", "t_delta"))),
                                  _np(beta["beta"]))


@pytest.mark.parametrize("case", sorted(REF["solve_posthoc_coefficients"]))
def test_solved_coefficients_equal_edm2(case):
    ref = REF["solve_posthoc_coefficients"][case]
    coefs = phema.solve_posthoc_coefficients(ref["in_ofs"], ref["in_std"], ref["out_ofs"], ref["out_std"])
    np.testing.assert_array_equal(coefs, _np(ref["coefs"]))


@pytest.mark.parametrize("case", sorted(REF["power_function_ema"]))
def test_power_function_ema_equals_edm2_after_each_update(case):
    ref = REF["power_function_ema"][case]
    module = torch.nn.Linear(4, 3)
    module.register_buffer("buf", torch.zeros(2))
    module.load_state_dict(ref["initial_state"])
    averages = phema.PowerFunctionEMA(module, ref["stds"])
    for index, nimg in enumerate(ref["cur_nimg_per_update"]):
        with torch.no_grad():
            module.weight.copy_(ref["param_trajectory"]["weight"][index])
            module.bias.copy_(ref["param_trajectory"]["bias"][index])
            module.buf += 1
        averages.update(module, nimg, ref["batch_size"])
        state = averages.state_dict()
        for std in ref["stds"]:
            for name in ("weight", "bias"):
                assert torch.equal(state[phema.std_name(std)][name], ref["ema_after_each_update"][f"{std:.3f}"][name][index])
            assert float(phema.power_function_beta(std, nimg, ref["batch_size"])) == \
                ref["beta_per_update"][f"{std:.3f}"][index].item()
    # EDM2's get() suffixes are our entry names after the prefix; its buffers are copied as ours are.
    assert [phema.std_name(std)[len(phema.PREFIX) - 1:] for std in ref["stds"]] == ref["get_suffixes"]
    for std, suffix in zip(ref["stds"], ref["get_suffixes"]):
        for name, value in ref["get_state"][suffix].items():
            assert torch.equal(averages.state_dict()[phema.std_name(std)][name], value)


def test_reconstruction_equals_edm2():
    ref = REF["reconstruct_phema"]
    coefs = phema.solve_posthoc_coefficients(ref["in_nimg"], ref["in_std"], ref["out_nimg"], ref["out_std"])
    np.testing.assert_array_equal(coefs, _np(ref["coefs"]))
    buffers = [name for name in ref["in_state_dicts"][0] if "fourier" in name]  # MPFourier's freqs and phases
    outputs = phema.reconstruct(zip(ref["in_nimg"], ref["in_std"], ref["in_state_dicts"]), coefs, buffers)
    for output, expected in zip(outputs, ref["out_state_dicts"], strict=True):
        assert output.keys() == expected.keys()
        for name, value in expected.items():
            assert output[name].dtype == torch.float16 and torch.equal(output[name], value), name


def test_std_names_round_trip():
    assert phema.std_name(0.05) == "std-0.050" and phema.std_name(0.1) == "std-0.100"
    assert phema.std_name(0.0125) == "std-0.0125" and phema.std_of(phema.std_name(0.0125)) == 0.0125
    assert phema.average_key("std-0.05") == phema.average_key("std-0.050") != phema.average_key("0.05")


# ----------------------------------------------------------------------------------------------------------
# The trainer.

PHEMA = ["--train.phema_stds=0.05,0.1", "--run.snapshot_every=1"]


def test_trainer_keeps_power_emas_instead_of_fixed_ones_and_stores_them(tmp_path):
    state = train_toy(tmp_path, "--train.steps=4", "--train.ema_rates=", *PHEMA)
    assert sorted(state["ema"]) == ["std-0.050", "std-0.100"]
    # The average after each step, recomputed from the stored weights of every step (batch 8 per step).
    model = checkpoint.build_model(state["model_spec"])
    model.load_state_dict(fileio.torch_load(checkpoint.snapshot_path(str(tmp_path), 1))["model"])
    expected = phema.PowerFunctionEMA(model, (0.05, 0.1))
    for step, path in checkpoint.find_snapshots(str(tmp_path)):
        snapshot = fileio.torch_load(path)
        model.load_state_dict(snapshot["model"])
        expected.update(model, step * 8, 8)
        for name, average in expected.state_dict().items():
            for key, value in average.items():
                assert torch.equal(snapshot["ema"][name][key], value), (step, name, key)
    generator = checkpoint.load_network(checkpoint.snapshot_path(str(tmp_path), 4), ema_rate="std-0.1")
    assert torch.equal(generator.state_dict()["net.0.weight"], state["ema"]["std-0.100"]["net.0.weight"])


def test_resume_restores_power_emas_exactly(tmp_path):
    common = ["--train.phema_stds=0.05,0.1", "--run.checkpoint_every=2", "--toy.dropout=0.5"]
    straight = train_toy(tmp_path / "straight", "--train.steps=6", *common)
    train_toy(tmp_path / "resumed", "--train.steps=4", *common)
    resumed = train_toy(tmp_path / "resumed", "--train.steps=6", *common)
    assert sorted(resumed["ema"]) == ["0.9", "0.99", "std-0.050", "std-0.100"]
    assert_same_training_state(straight, resumed)


def test_fp16_overflow_still_advances_the_power_emas(tmp_path):
    state = train_toy(tmp_path, "--train.steps=1", "--train.precision=fp16", "--toy.overflow_step=0",
                      "--train.phema_stds=0.05")
    # The first update copies the (unchanged) weights: β = 0 at nimg = batch.
    for key, value in state["model"].items():
        assert torch.equal(state["ema"]["std-0.050"][key], value)


def test_phema_stds_are_validated(tmp_path):
    from pid_diffusion.config import ConfigError, TrainConfig
    for stds in ((0.0,), (0.3,), (0.05, 0.05)):
        with pytest.raises(ConfigError, match="train.phema_stds"):
            TrainConfig(phema_stds=stds)


# ----------------------------------------------------------------------------------------------------------
# pid-phema.

def test_pid_phema_reconstructs_at_two_stds_and_adds_more(tmp_path, capsys):
    train_toy(tmp_path, "--train.steps=4", *PHEMA)
    phema_cli.main([str(tmp_path), "--std", "0.08", "0.03", "--step", "3"])
    out = tmp_path / "phema-00000003.pt"
    assert f"wrote {out} (ema std-0.030, std-0.080)" in capsys.readouterr().out
    written = fileio.torch_load(out)
    assert written["step"] == 3 and sorted(written["ema"]) == ["std-0.030", "std-0.080"]

    # The same sum from the snapshots of steps 1-3, by the fixture-checked pieces.
    inputs = [(step * 8, std, fileio.torch_load(path)["ema"][phema.std_name(std)])
              for step, path in checkpoint.find_snapshots(str(tmp_path)) if step <= 3 for std in (0.05, 0.1)]
    coefs = phema.solve_posthoc_coefficients([i[0] for i in inputs], [i[1] for i in inputs], 24, [0.03, 0.08])
    np.testing.assert_allclose(coefs.sum(axis=0), 1.0)
    for j, std in enumerate((0.03, 0.08)):
        assert written["phema"][phema.std_name(std)]["coefs"] == coefs[:, j].tolist()
        for key, value in written["ema"][phema.std_name(std)].items():
            expected = inputs[0][2][key] * 0
            if key == "gain":  # The buffer: copied.
                expected = inputs[-1][2][key]
            else:
                for index, (_, _, state) in enumerate(inputs):
                    expected = expected + state[key] * float(coefs[index, j])
            assert torch.equal(value, expected), key

    # A second call at the same step keeps the first's; the file samples like a snapshot.
    phema_cli.main([str(tmp_path), "--std", "0.15", "--step", "3"])
    assert sorted(fileio.torch_load(out)["ema"]) == ["std-0.030", "std-0.080", "std-0.150"]
    net = checkpoint.load_network(str(out), ema_rate="std-0.03")
    assert torch.equal(net.state_dict()["net.0.weight"], written["ema"]["std-0.030"]["net.0.weight"])
    # At an input's own std and the newest step, the reconstruction is that input.
    phema_cli.main([str(tmp_path), "--std", "0.1", "--out", str(tmp_path / "own.pt")])
    own, last = fileio.torch_load(tmp_path / "own.pt"), fileio.torch_load(checkpoint.snapshot_path(str(tmp_path), 4))
    for key, value in last["ema"]["std-0.100"].items():
        torch.testing.assert_close(own["ema"]["std-0.100"][key], value, rtol=1e-5, atol=1e-6)


def test_pid_phema_errors_name_the_fix(tmp_path, capsys):
    train_toy(tmp_path, "--train.steps=2", "--run.snapshot_every=1")
    with pytest.raises(SystemExit) as exit_info:
        phema_cli.main([str(tmp_path), "--std", "0.05"])
    assert exit_info.value.code == 2
    assert "pid-phema: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        phema_cli.main([str(tmp_path), "--std", "0.3"])
    assert "not a relative standard deviation" in capsys.readouterr().err
    train_toy(tmp_path / "p", "--train.steps=2", *PHEMA)
    with pytest.raises(SystemExit):
        phema_cli.main([str(tmp_path / "p"), "--std", "0.05", "--step", "7"])
    assert "no snapshot of step 7" in capsys.readouterr().err
    with pytest.raises(posthoc_ema.NoPowerEMAError, match="--train.phema_stds"):
        posthoc_ema.snapshot_inputs(str(tmp_path))
