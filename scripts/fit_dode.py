"""Distill a D-ODE solver for a frozen EDM teacher; see `pid_diffusion.cli.fit_dode`."""

from pid_diffusion.cli.fit_dode import main

if __name__ == "__main__":
    raise SystemExit(main())
