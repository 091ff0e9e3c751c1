"""FID and Inception Score of every checkpoint in a run folder; see `pid_diffusion.cli.fid` (`pid-fid`)."""

from pid_diffusion.cli.fid import main

if __name__ == "__main__":
    main()
