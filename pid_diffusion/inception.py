"""EDM's Inception-v3 detector (`inception-2015-12-05`), the network behind its FID and StyleGAN2-ADA's IS.

The TensorFlow Inception graph of 2015-12-05, ported to TorchScript by NVIDIA (the file clean-fid calls
`legacy_tensorflow`). It takes uint8-valued NCHW images at any resolution, resizes them to 299 internally
(TF1 bilinear) and normalises with (x - 128) / 128. EDM's `.pkl` copy of the same weights is not read: it
is a pickle that runs code on loading; the TorchScript file holds the same network.
"""

import hashlib
import io
import warnings

import torch

from pid_diffusion.user_error import FileFormatError, MissingFileError
from pid_diffusion.utils import fileio, hub

__all__ = ["DETECTOR", "DETECTOR_FILENAME", "DETECTOR_URL", "FEATURE_DIM", "NUM_CLASSES", "Detector", "load_detector"]

DETECTOR_FILENAME = "inception-2015-12-05.pt"
DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + DETECTOR_FILENAME
DETECTOR = hub.WeightFile(DETECTOR_FILENAME, DETECTOR_URL, used_by="EDM's Inception detector of FID and IS")
FEATURE_DIM = 2048  # pool_3 features, the FID space
NUM_CLASSES = 1008  # outputs of the 2015 graph's ImageNet classifier (the Inception Score's p(y|x))


class Detector:
    """The TorchScript detector on a device: pool features for FID, class probabilities for IS."""

    def __init__(self, module: torch.jit.ScriptModule | torch.nn.Module, device: torch.device | str = "cpu",
                 source: str = "", sha256: str = ""):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.source = source  # the file it was loaded from, recorded beside the numbers it produces
        self.sha256 = sha256  # of that file, named by the comparability warning
        self._warned = False

    def comparability_warning(self, feature_dim: int) -> str | None:
        """Once per detector: why its FIDs are not comparable with published ones (EDM's detector is the file
        `inception-2015-12-05.pt` with 2048-d features), or None when nothing says so."""
        name = self.source.rsplit("/", 1)[-1]
        if self._warned or (feature_dim == FEATURE_DIM and name == DETECTOR_FILENAME):
            return None
        self._warned = True
        return (f"warning: the detector {self.source} (sha256 {self.sha256}) is not EDM's Inception detector "
                f"({DETECTOR_FILENAME}, {FEATURE_DIM}-d features; this one: {name}, {feature_dim}-d): its FIDs are "
                f"not comparable with published ones")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 2048] pool features of uint8 NCHW images (EDM fid.py)."""
        return self.module(self._prepare(images), return_features=True)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1008] softmax class probabilities without the output bias, as StyleGAN2-ADA's IS (and
        Salimans et al.'s original TensorFlow code) compute them."""
        return self.module(self._prepare(images), no_output_bias=True)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        # Quantised images only: EDM measures the uint8 images it would save, not the float samples.
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"The detector takes uint8 NCHW images with 1 or 3 channels, got {images.dtype} of shape "
                f"{tuple(images.shape)}; quantise samples with images.to_uint8 first."
            )
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grayscale images, as EDM's fid.py repeats them
        return images.to(self.device)


def load_detector(path: str | None = None, device: torch.device | str = "cpu") -> Detector:
    """Load the TorchScript detector from `path`, or from the torch hub cache when `path` is None
    (`$TORCH_HOME/hub/checkpoints/inception-2015-12-05.pt`, downloaded there only when a network exists)."""
    if path is None:
        (path,) = hub.resolve(DETECTOR)
    elif not fileio.exists(path):
        raise MissingFileError(
            f"No Inception detector at {path}. Download {DETECTOR_URL} there, or leave --detector unset to use "
            f"the torch hub cache."
        )
    with warnings.catch_warnings():
        # torch 2.x deprecates TorchScript, but the detector exists only as TorchScript (and EDM's pickle).
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
        data = fileio.read_bytes(path)
        try:
            module = torch.jit.load(io.BytesIO(data), map_location=device)
        except RuntimeError as error:  # torch.jit's message for a file that is not TorchScript's zip
            raise FileFormatError(f"{path} is not a TorchScript detector ({str(error).split('. ')[0]}); give EDM's "
                                  f"Inception detector, {DETECTOR_URL}") from error
    return Detector(module, device, source=str(path), sha256=hashlib.sha256(data).hexdigest())
