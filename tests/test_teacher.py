"""Teacher checkpoints: EDM pickles read without running their code, converted, and loaded as the teacher.

The pickles are written in EDM's layout (`torch_utils.persistence`) by factories.write_edm_pickle: every EDM
object becomes a call `_reconstruct_persistent_obj(meta)` carrying its source file and `__dict__`. The fake
`torch_utils` module that writing needs exists only while writing, so every load below runs without it.
"""

import io
import os
import pickle
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pid_diffusion.networks import edm
from pid_diffusion.cli.convert_edm import main as convert_main
from pid_diffusion.edm_pickle import load_edm_pickle, state_dict_of
from pid_diffusion.networks.edm import EDMPrecond, UNetBlock
from pid_diffusion.teacher import (
    EDM_RELEASE_URL, TeacherFormat, TeacherFileError, convert_edm, load_teacher, read_teacher_file,
)

from factories import EDMLoss, edm_release, mark_persistent, write_edm_pickle

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASE_DROPOUT = 0.13  # The CIFAR-10 checkpoints' recorded dropout, which load_teacher must override.
FP32_ATOL = 1e-5  # The fixtures' stated float32 tolerance.
TINY_PRESET = "tiny-song-cond"  # Registered in EDM_PRESETS by the tests that need a preset.


def _reference(edm_fixtures_dir: Path, name: str, dropout: float = RELEASE_DROPOUT) -> tuple[EDMPrecond, dict, dict]:
    """The fixture network rebuilt with `dropout` (as a release records it), its kwargs, and the fixture."""
    ref = torch.load(edm_fixtures_dir / name, weights_only=True)
    kwargs = {**ref["precond_kwargs"], "dropout": dropout}
    network = EDMPrecond(**kwargs)
    network.load_state_dict(ref["state_dict"], strict=True)
    return network.eval(), kwargs, ref


def _denoise(network: nn.Module, ref: dict) -> torch.Tensor:
    with torch.no_grad():
        return network(ref["x"], ref["sigma"], ref["class_labels"])


@pytest.fixture
def release_pkl(tmp_path, edm_fixtures_dir):
    network, kwargs, ref = _reference(edm_fixtures_dir, "ref_song_cond.pt")
    return write_edm_pickle(tmp_path / "edm-release.pkl", edm_release(network, kwargs)), network, kwargs, ref


@pytest.fixture
def tiny_preset(monkeypatch, edm_fixtures_dir):
    """Register the fixture architecture as a preset, with the release's dropout like the real presets."""
    _, kwargs, _ = _reference(edm_fixtures_dir, "ref_song_cond.pt")
    monkeypatch.setitem(edm.EDM_PRESETS, TINY_PRESET, kwargs)
    return TINY_PRESET


# ----------------------------------------------------------------------------------------------------------
# Reading EDM pickles.

def test_release_round_trip_gives_identical_outputs(release_pkl, tmp_path):
    """pkl → pid-convert-edm → torch.load(weights_only) → EDMPrecond(**network_kwargs), strict: same numbers."""
    pkl, network, kwargs, ref = release_pkl
    dst = tmp_path / "teacher.pt"
    assert convert_main([str(pkl), str(dst)]) == 0
    converted = torch.load(dst, weights_only=True)
    assert converted["network_kwargs"] == kwargs
    assert list(converted["state_dict"]) == list(network.state_dict())
    rebuilt = EDMPrecond(**converted["network_kwargs"])
    rebuilt.load_state_dict(converted["state_dict"], strict=True)
    assert torch.equal(_denoise(rebuilt.eval(), ref), _denoise(network, ref))
    # And what EDM's own code computed for these weights.
    assert (_denoise(rebuilt, ref) - ref["D_fp32"]).abs().max().item() < FP32_ATOL


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_snapshot_reads_at_every_pickle_protocol(protocol, tmp_path, edm_fixtures_dir):
    """An ImageNet-style snapshot (ADM, no augment pipe) gives EDM's exact state_dict and kwargs."""
    network, kwargs, ref = _reference(edm_fixtures_dir, "ref_dhariwal_cond.pt")
    snapshot = dict(ema=mark_persistent(network, kwargs), loss_fn=EDMLoss(), augment_pipe=None,
                    dataset_kwargs=dict(path="imagenet-64x64.zip", use_labels=True))
    checkpoint = read_teacher_file(write_edm_pickle(tmp_path / "snap.pkl", snapshot, protocol=protocol))
    assert checkpoint.source_format is TeacherFormat.EDM_PICKLE
    assert checkpoint.network_kwargs == kwargs
    assert list(checkpoint.state_dict) == list(ref["state_dict"])
    assert all(torch.equal(checkpoint.state_dict[key], value) for key, value in ref["state_dict"].items())


class _Buffers(nn.Module):
    """Every kind of state_dict entry: a parameter, an absent one, buffers kept and not kept, nested children."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))
        self.register_parameter("bias", None)
        self.register_buffer("running", torch.arange(3.0))
        self.register_buffer("cache", torch.ones(2), persistent=False)
        self.blocks = nn.ModuleDict({"inner": nn.Sequential(nn.Linear(3, 2)), "empty": nn.ModuleList()})


def test_state_dict_of_matches_torch(tmp_path):
    module = mark_persistent(_Buffers(), {})
    with open(write_edm_pickle(tmp_path / "buffers.pkl", dict(ema=module)), "rb") as file:
        record = load_edm_pickle(file)["ema"]
    expected = module.state_dict()
    assert list(expected) == ["weight", "running", "blocks.inner.0.weight", "blocks.inner.0.bias"]
    state_dict = state_dict_of(record)
    assert list(state_dict) == list(expected)
    assert all(torch.equal(state_dict[key], value) for key, value in expected.items())


def test_module_src_is_never_executed(tmp_path, edm_fixtures_dir):
    marker = tmp_path / "module_src_ran"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
    network, kwargs, ref = _reference(edm_fixtures_dir, "ref_song_cond.pt")
    pkl = write_edm_pickle(tmp_path / "src.pkl", edm_release(network, kwargs), module_src=payload)
    teacher = load_teacher(pkl)
    assert not marker.exists()
    assert torch.equal(_denoise(teacher, ref), _denoise(network, ref))
    exec(compile(payload, "module_src", "exec"), {})  # The payload is live: EDM's loader would have run it.
    assert marker.exists()


class _SystemCall:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_forbidden_global_is_refused_by_name(tmp_path, edm_fixtures_dir):
    marker = tmp_path / "os_system_ran"
    network, kwargs, _ = _reference(edm_fixtures_dir, "ref_song_cond.pt")
    data = edm_release(network, kwargs)
    data["dataset_kwargs"]["path"] = _SystemCall(f"touch {marker}")
    pkl = write_edm_pickle(tmp_path / "evil.pkl", data)
    with pytest.raises(TeacherFileError) as error:
        read_teacher_file(pkl)
    assert f"{os.system.__module__}.{os.system.__name__}" in str(error.value)
    assert "not an EDM checkpoint or was modified" in str(error.value)
    assert str(pkl) in str(error.value)
    assert not marker.exists()


class _StorageBytes:
    """Pickles as EDM's storages do, `torch.storage._load_from_bytes(torch.save payload)`, around any object."""

    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        buffer = io.BytesIO()
        torch.save(self.payload, buffer, _use_new_zipfile_serialization=False)
        return torch.storage._load_from_bytes, (buffer.getvalue(),)


def test_storage_bytes_are_loaded_with_weights_only(tmp_path, edm_fixtures_dir):
    """torch's own `_load_from_bytes` unpickles its payload unrestricted; the loader must not."""
    marker = tmp_path / "storage_payload_ran"
    network, kwargs, _ = _reference(edm_fixtures_dir, "ref_song_cond.pt")
    data = edm_release(network, kwargs)
    data["dataset_kwargs"]["path"] = _StorageBytes(_SystemCall(f"touch {marker}"))
    with pytest.raises(TeacherFileError, match="weights_only|Unsupported global") as error:
        read_teacher_file(write_edm_pickle(tmp_path / "evil_storage.pkl", data))
    assert f"{os.system.__module__}.{os.system.__name__}" in str(error.value)
    assert not marker.exists()


def test_other_edm_contents_are_refused(tmp_path, edm_fixtures_dir):
    network, kwargs, _ = _reference(edm_fixtures_dir, "ref_song_cond.pt")
    no_ema = write_edm_pickle(tmp_path / "no_ema.pkl", dict(net=mark_persistent(network, kwargs)))
    with pytest.raises(TeacherFileError, match=r"expected EDM's dict\(ema=.*found \['net'\]"):
        read_teacher_file(no_ema)
    with pytest.raises(TeacherFileError, match="records its own network_kwargs; drop the preset"):
        read_teacher_file(write_edm_pickle(tmp_path / "release.pkl", edm_release(network, kwargs)), "x")


class VPPrecond(nn.Module):
    """Named like EDM's VP baseline wrapper, which PID does not distil."""


def test_non_edm_precond_is_refused(tmp_path):
    pkl = write_edm_pickle(tmp_path / "vp.pkl", dict(ema=mark_persistent(VPPrecond(), {})))
    with pytest.raises(TeacherFileError, match="ema network is a VPPrecond; PID distils EDMPrecond"):
        read_teacher_file(pkl)


# ----------------------------------------------------------------------------------------------------------
# Other formats and errors.

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_official_pid_state_dict_with_preset(zipped, tiny_preset, tmp_path, edm_fixtures_dir):
    """Keys without `model.`, no map_augment: restored (zeros), and D(x; σ) equals EDM's without augment labels."""
    _, _, ref = _reference(edm_fixtures_dir, "ref_song_cond.pt")
    stripped = {key.removeprefix("model."): value for key, value in ref["state_dict"].items()
                if not key.startswith("model.map_augment.")}
    src = tmp_path / "pid_teacher.pt"
    torch.save(stripped, src, _use_new_zipfile_serialization=zipped)
    with pytest.raises(TeacherFileError, match=f"plain state dict.*preset.*{tiny_preset}"):
        load_teacher(src)
    teacher = load_teacher(src, preset=tiny_preset)
    assert torch.count_nonzero(teacher.model.map_augment.weight) == 0
    assert (_denoise(teacher, ref) - ref["D_fp32"]).abs().max().item() < FP32_ATOL

    dst = tmp_path / "teacher.pt"
    assert convert_main([str(src), str(dst), "--preset", tiny_preset]) == 0
    converted = read_teacher_file(dst)
    assert converted.source_format is TeacherFormat.CONVERTED
    assert converted.network_kwargs == edm.EDM_PRESETS[tiny_preset]
    assert torch.equal(_denoise(load_teacher(dst), ref), _denoise(teacher, ref))


def test_mismatched_checkpoint_lists_every_bad_key(release_pkl, tmp_path):
    pkl, _, _, _ = release_pkl
    good = tmp_path / "good.pt"
    convert_edm(pkl, good)
    data = torch.load(good, weights_only=True)
    state_dict = data["state_dict"]
    del state_dict["model.map_layer1.bias"]
    state_dict["model.extra.weight"] = torch.zeros(3)
    state_dict["model.map_label.weight"] = torch.zeros(7, 7)
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    for attempt in (lambda: load_teacher(bad), lambda: convert_edm(bad, tmp_path / "never.pt")):
        with pytest.raises(TeacherFileError) as error:
            attempt()
        message = str(error.value)
        assert "missing (1): model.map_layer1.bias" in message
        assert "unexpected (1): model.extra.weight" in message
        assert "mis-shaped (1): model.map_label.weight [7, 7] (network [16, 10])" in message
    assert not (tmp_path / "never.pt").exists()


def test_dropout_override_reaches_every_block(release_pkl, edm_fixtures_dir):
    pkl, _, _, ref = release_pkl
    blocks = lambda network: [module for module in network.modules() if isinstance(module, UNetBlock)]
    default = load_teacher(pkl)
    assert not default.training and not any(p.requires_grad for p in default.parameters())
    assert blocks(default) and all(block.dropout == 0.0 for block in blocks(default))
    assert default.init_kwargs["dropout"] == 0.0
    # Even in training mode the default teacher is deterministic: dropout 0 replaced the recorded 0.13.
    assert torch.equal(_denoise(default.train(), ref), _denoise(default, ref))

    noisy = load_teacher(pkl, dropout=0.5).train()
    assert all(block.dropout == 0.5 for block in blocks(noisy))
    torch.manual_seed(0)
    assert not torch.equal(_denoise(noisy, ref), _denoise(noisy, ref))


def test_missing_file_says_where_to_get_edm_checkpoints(tmp_path):
    missing = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    with pytest.raises(FileNotFoundError) as error:
        load_teacher(missing)
    for expected in (str(missing), EDM_RELEASE_URL, "edm-cifar10-32x32-uncond-vp", "pid-convert-edm"):
        assert expected in str(error.value)


def test_script_converts(release_pkl, tmp_path, monkeypatch, capsys):
    """`python scripts/convert_edm.py SRC DST`, run in-process as __main__."""
    pkl, network, _, ref = release_pkl
    dst = tmp_path / "script_teacher.pt"
    monkeypatch.setattr(sys, "argv", ["convert_edm.py", str(pkl), str(dst)])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(REPO_ROOT / "scripts" / "convert_edm.py"), run_name="__main__")
    assert exit_status.value.code == 0
    assert f"-> {dst}" in capsys.readouterr().out
    assert torch.equal(_denoise(load_teacher(dst), ref), _denoise(network, ref))
