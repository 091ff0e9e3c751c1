"""Sample images from a PID student or an EDM teacher; see `pid_diffusion.cli.sample` (`pid-sample`)."""

from pid_diffusion.cli.sample import main

if __name__ == "__main__":
    main()
