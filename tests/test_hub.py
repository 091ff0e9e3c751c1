"""Pretrained-weight resolution: cache hits, real (file://) downloads with hash checks, clear errors."""

import hashlib
import urllib.error

import pytest
import torch

from pid_diffusion.utils import hub


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; torch.hub.get_dir() follows it."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def source_file(tmp_path):
    """A file served through a file:// URL, so the real download path runs without a network."""
    path = tmp_path / "served" / "weights.bin"
    path.parent.mkdir()
    path.write_bytes(b"pretrained weights")
    return path


def offline(url, dst, *args, **kwargs):
    raise urllib.error.URLError("network unreachable (simulated)")


def test_checkpoints_dir_follows_torch_home(torch_home):
    assert hub.checkpoints_dir() == torch_home / "hub" / "checkpoints"


def test_present_file_is_not_downloaded(torch_home, monkeypatch):
    path = torch_home / "hub" / "checkpoints" / hub.VGG16_IMAGENET.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"cached")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert hub.resolve(hub.VGG16_IMAGENET) == [path]
    assert path.read_bytes() == b"cached"  # not re-downloaded, hash not re-checked


def test_absent_file_is_downloaded_and_hash_checked(torch_home, source_file):
    sha256 = hashlib.sha256(source_file.read_bytes()).hexdigest()
    (path,) = hub.resolve(hub.WeightFile("weights.bin", source_file.as_uri(), sha256_prefix=sha256[:8]))
    assert path == torch_home / "hub" / "checkpoints" / "weights.bin"
    assert path.read_bytes() == source_file.read_bytes()
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_hash_mismatch_leaves_nothing_and_says_so(torch_home, source_file):
    with pytest.raises(hub.MissingWeightsError, match="invalid hash value"):
        hub.resolve(hub.WeightFile("weights.bin", source_file.as_uri(), sha256_prefix="00000000"))
    assert not any((torch_home / "hub" / "checkpoints").iterdir())


def test_every_missing_file_is_named_in_one_error(torch_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as raised:
        hub.resolve(hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS)
    message = str(raised.value)
    checkpoints = torch_home / "hub" / "checkpoints"
    for file in (hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS):
        assert file.url in message
        assert str(checkpoints / file.filename) in message
    assert "2 pretrained weight file(s) missing" in message and "network unreachable" in message


def test_only_the_missing_file_is_reported(torch_home, monkeypatch):
    present = torch_home / "hub" / "checkpoints" / hub.VGG16_IMAGENET.filename
    present.parent.mkdir(parents=True)
    present.write_bytes(b"cached")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(hub.MissingWeightsError) as raised:
        hub.resolve(hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS)
    assert hub.PIQ_LPIPS_WEIGHTS.filename in str(raised.value)
    assert hub.VGG16_IMAGENET.filename not in str(raised.value)


def test_known_weights_table():
    assert hub.VGG16_IMAGENET.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert hub.PIQ_LPIPS_WEIGHTS.url.endswith("/lpips_weights.pt")
    for file in (hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS):  # torch.hub derives the cache name from the URL
        assert file.url.rsplit("/", 1)[-1] == file.filename


@pytest.mark.parametrize("filename", ["", "sub/weights.pt", "../weights.pt"])
def test_filename_must_be_bare(filename):
    with pytest.raises(ValueError, match="bare file name"):
        hub.WeightFile(filename, "https://example.org/weights.pt")
