"""Convert an EDM checkpoint into a pid-diffusion teacher checkpoint; see `pid_diffusion.cli.convert_edm`."""

from pid_diffusion.cli.convert_edm import main

if __name__ == "__main__":
    raise SystemExit(main())
