"""Post-hoc EMA reconstruction of a run folder; see `pid_diffusion.cli.phema` (`pid-phema`)."""

from pid_diffusion.cli.phema import main

if __name__ == "__main__":
    main()
