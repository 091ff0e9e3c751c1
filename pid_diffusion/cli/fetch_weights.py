"""pid-fetch-weights: put every pretrained file a distillation configuration reads where the run looks for it,
ahead of time (on a login node with network access, before the job waits in an offline queue).

The files: the distance's weights in torch hub's cache (`$TORCH_HOME/hub/checkpoints/`; lpips_piq: VGG16
`vgg16-397923af.pth` and piq's `lpips_weights.pt`; lpips_vgg: VGG16 alone; l2, l1, pseudo_huber: none), EDM's
Inception detector `inception-2015-12-05.pt` in the same cache (pid-fid; --no-detector skips it), with
--fd-dinov2 DINOv2 ViT-L/14 `dinov2_vitl14_pretrain.pth` (FD_DINOv2: pid-fid --fd-dinov2), and the
teacher at `teacher.path` when it names one of EDM's release files (`edm-cifar10-32x32-uncond-vp.pkl`, ...) or
its converted `.pt` (the `.pkl` is downloaded beside it and converted, as pid-convert-edm does).
A file already there is not fetched again. Where a file cannot be downloaded, the command prints its URL and
the exact path to copy it to, and exits with status 1.

    pid-fetch-weights --preset=cifar10
    pid-fetch-weights --preset=cifar10 --fd-dinov2
    TORCH_HOME=/shared/torch pid-fetch-weights --preset=imagenet64 --teacher.path=/shared/edm-imagenet-64x64-cond-adm.pkl
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

from pid_diffusion import dinov2, inception
from pid_diffusion.utils import fileio, hub
from pid_diffusion.cli import errors, options
from pid_diffusion.distill import TASK, DistillConfig, teacher_release, weight_files
from pid_diffusion.teacher import convert_edm


def build_parser():
    parser = options.parser("pid-fetch-weights", __doc__)
    options.add_configuration_source(parser, TASK)
    parser.add_argument("--no-detector", action="store_true", help="skip the Inception detector of FID")
    parser.add_argument("--fd-dinov2", action="store_true", help="also DINOv2 ViT-L/14, the network of FD_DINOv2")
    parser.epilog = "Configuration overrides: --section.key=value, as pid-distill takes them."
    return parser


def _fetch_teacher(config: DistillConfig) -> bool:
    """The teacher file: present, downloaded from EDM's release (and converted, for a `.pt` path), or told where
    to get it. Whether it is there."""
    path = config.teacher.path
    if fileio.exists(path):
        print(f"present  {path}  (the teacher)")
        return True
    url = teacher_release(config)
    if url is None or not fileio.is_local(path):
        print(f"missing  {path}  (the teacher): not one of EDM's release files; copy it there "
              f"(EDM's networks: {url or 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/<name>.pkl'})")
        return False
    pickle = path if path.endswith(".pkl") else f"{path[:-len('.pt')]}.pkl"  # A .pt is converted from EDM's .pkl.
    folder = os.path.dirname(os.path.abspath(path))
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        if not fileio.exists(pickle):
            print(f"Downloading {url} to {pickle}", file=sys.stderr)
            torch.hub.download_url_to_file(url, pickle, progress=False)  # A temporary file, renamed when complete.
    except (OSError, RuntimeError, ValueError) as error:
        if created:
            os.rmdir(folder)
        convert = "" if pickle == path else f"\n      then     pid-convert-edm {pickle} {path}"
        print(f"missing  {path}  (the teacher)\n      download {url}\n      save as  {os.path.abspath(pickle)}"
              f"{convert}\n      download error: {type(error).__name__}: {error}")
        return False
    if pickle != path:
        convert_edm(pickle, path)  # Written atomically; the .pkl stays beside it.
        print(f"fetched  {path}  (the teacher, converted from {pickle}, from {url})")
    else:
        print(f"fetched  {path}  (the teacher, from {url})")
    return True


def main(argv: Sequence[str] | None = None) -> None:
    with errors.reported("pid-fetch-weights"):
        parser = build_parser()
        args, config = options.parse_training(parser, DistillConfig, TASK, argv)
        files = [*weight_files(config), *([] if args.no_detector else [inception.DETECTOR]),
                 *([dinov2.DINOV2] if args.fd_dinov2 else [])]
        complete = _fetch_teacher(config)
        absent = hub.missing(*files)
        try:
            hub.resolve(*files)
        except hub.MissingWeightsError as error:
            print(error)  # Each missing file's URL, destination and download error.
            complete = False
        for file in files:
            if file not in hub.missing(file):
                state = "fetched" if file in absent else "present"
                print(f"{state}  {hub.checkpoints_dir() / file.filename}  ({file.used_by})")
        if not complete:
            print("Some files are missing: on a machine with network access, run this command again, or download "
                  "them elsewhere and copy them to the paths above (`TORCH_HOME` moves the hub cache).")
            sys.exit(1)


if __name__ == "__main__":
    main()
