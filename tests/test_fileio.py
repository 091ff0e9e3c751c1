"""Atomic writes: a failed write never replaces a good file and leaves no temporary behind."""

import pytest
import torch

from pid_diffusion.utils import fileio


def test_torch_round_trip(tmp_path):
    path = fileio.join(tmp_path, "sub", "state.pt")
    fileio.atomic_torch_save({"w": torch.arange(4.0)}, path)
    assert torch.equal(fileio.torch_load(path)["w"], torch.arange(4.0))
    assert fileio.listdir(fileio.join(tmp_path, "sub")) == ["state.pt"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "result.txt"
    fileio.atomic_write_text("good", path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write_text("partial", path)
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_torch_load_refuses_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save(Payload(), path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        fileio.torch_load(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        fileio.read_bytes(tmp_path / "nothing.pt")


def test_blob_urls_are_not_local():
    assert fileio.is_local("/tmp/x") and fileio.is_local("runs/x")
    assert not fileio.is_local("gs://bucket/x") and not fileio.is_local("az://account/container/x")
