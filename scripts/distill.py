"""Distil an EDM teacher into a one-step PID student; see `pid_diffusion.cli.distill` (`pid-distill`)."""

from pid_diffusion.cli.distill import main

if __name__ == "__main__":
    main()
