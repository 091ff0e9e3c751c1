"""`pid-convert-edm SRC DST`: turn an EDM or EDM2 `.pkl` (or a PID state dict + `--preset`) into a teacher
file (network arguments, weights in float32 for EDM2's float16 releases, and EDM2's encoder)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from pid_diffusion.networks import edm
from pid_diffusion.cli import errors
from pid_diffusion.teacher import convert_edm


def _parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(
        prog="pid-convert-edm", description=__doc__,
        epilog="EDM's pretrained networks: https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/<name>.pkl; EDM2's: "
               "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/<name>.pkl")
    parser.add_argument("src", help="EDM .pkl (release file or network snapshot) or a plain state-dict .pt; "
                                    "local path or gs:// / az:// URL")
    parser.add_argument("dst", help="teacher file to write (.pt), written atomically")
    parser.add_argument("--preset", choices=list(edm.EDM_PRESETS),
                        help="architecture of a plain state dict, which does not record it (not for .pkl files)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, convert, and print what was written."""
    with errors.reported("pid-convert-edm"):
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        teacher = convert_edm(args.src, args.dst, preset=args.preset)
    num_parameters = sum(tensor.numel() for tensor in teacher.state_dict.values())
    network = (f"EDMPrecond(model_type={teacher.network_kwargs.get('model_type')!r})"
               if teacher.class_name == "EDMPrecond" else f"EDM2 {teacher.class_name}")
    encoder = f", encoder {teacher.encoder['class_name']}" if teacher.encoder else ""
    print(f"{args.src} ({teacher.source_format.value}) -> {args.dst}: {network}{encoder}, "
          f"{len(teacher.state_dict)} tensors, {num_parameters:,} values")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
