"""Reference statistics of a data set in EDM's format; see `pid_diffusion.cli.fid_ref` (`pid-fid-ref`)."""

from pid_diffusion.cli.fid_ref import main

if __name__ == "__main__":
    main()
