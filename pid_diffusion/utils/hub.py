"""Pretrained weight files in torch hub's cache (`$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch`).

A file is downloaded only when it is absent; torchvision and piq then find it in the same cache, so building
an LPIPS network never downloads anything behind the caller's back. Without a network, the error names every
missing file, its URL and the exact path to copy it to.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from pid_diffusion.user_error import UserError

import torch

__all__ = [
    "PIQ_LPIPS_WEIGHTS",
    "VGG16_IMAGENET",
    "MissingWeightsError",
    "WeightFile",
    "checkpoints_dir",
    "missing",
    "require_present",
    "resolve",
]


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file: its name in the cache, its source, and who needs it (for error messages)."""

    filename: str
    url: str
    sha256_prefix: str | None = None  # checked on download only, as torch.hub does
    used_by: str = ""

    def __post_init__(self) -> None:
        if not self.filename or Path(self.filename).name != self.filename:
            raise ValueError(f"filename must be a bare file name inside the hub cache, got {self.filename!r}")


# torchvision's ImageNet VGG16 (`vgg16(pretrained=True)`): the feature network of piq's LPIPS and of the
# `lpips` package. torch.hub's naming convention puts the SHA-256 prefix in the file name.
VGG16_IMAGENET = WeightFile(
    filename="vgg16-397923af.pth",
    url="https://download.pytorch.org/models/vgg16-397923af.pth",
    sha256_prefix="397923af",
    used_by="torchvision's ImageNet VGG16: the feature network of LPIPS in piq and in the lpips package",
)
# piq 0.8's LPIPS layer weights (`piq.LPIPS._weights_url`): five tensors [1, C, 1, 1]. The `lpips` package
# instead ships its linear layers inside its own installation, so it needs only VGG16 from here.
PIQ_LPIPS_WEIGHTS = WeightFile(
    filename="lpips_weights.pt",
    url="https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt",
    used_by="piq's LPIPS layer weights",
)


class MissingWeightsError(UserError, FileNotFoundError):
    """Pretrained weight files are absent from the hub cache and could not be downloaded."""


def checkpoints_dir() -> Path:
    """`torch.hub.get_dir()/checkpoints`, where torchvision and piq look for their files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def missing(*files: WeightFile) -> list[WeightFile]:
    """The files absent from the hub cache (nothing is downloaded or read)."""
    return [file for file in files if not (checkpoints_dir() / file.filename).is_file()]


def require_present(*files: WeightFile) -> None:
    """A MissingWeightsError naming every absent file, its URL and where to put it; nothing is downloaded
    (a dry-run checks that a job on an offline machine would find its files)."""
    absent = missing(*files)
    if absent:
        why = FileNotFoundError("not in the cache; a run downloads it only where the machine has network access "
                                "(pid-fetch-weights does it ahead of time)")
        raise MissingWeightsError(_missing_message([(file, checkpoints_dir() / file.filename, why) for file in absent]))


def resolve(*files: WeightFile) -> list[Path]:
    """Paths of `files` in the hub cache, downloading (atomically) those that are absent. Raises one
    MissingWeightsError that lists every file that is still missing."""
    directory = checkpoints_dir()
    paths, failures = [], []
    for file in files:
        path = directory / file.filename
        if not path.is_file():
            try:
                _download(file, path)
            except (OSError, RuntimeError, ValueError) as error:  # no network, HTTP error, hash mismatch
                failures.append((file, path, error))
        paths.append(path)
    if failures:
        raise MissingWeightsError(_missing_message(failures))
    return paths


def _download(file: WeightFile, path: Path) -> None:
    """Fetch `file` to `path`; torch.hub writes a temporary file and renames it, so `path` is never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {file.url} to {path}", file=sys.stderr)
    torch.hub.download_url_to_file(file.url, str(path), hash_prefix=file.sha256_prefix, progress=False)


def _missing_message(failures: list[tuple[WeightFile, Path, Exception]]) -> str:
    lines = [f"{len(failures)} pretrained weight file(s) missing from {failures[0][1].parent}:"]
    for file, path, error in failures:
        role = f" ({file.used_by})" if file.used_by else ""
        lines.append(f"  - {file.filename}{role}\n      download {file.url}\n      save as  {path}\n"
                     f"      download error: {type(error).__name__}: {error}")
    lines.append("Without network access here, download them elsewhere and copy them to the paths above, or set "
                 "TORCH_HOME to a folder whose hub/checkpoints/ holds them; `pid-fetch-weights` downloads them all.")
    return "\n".join(lines)
