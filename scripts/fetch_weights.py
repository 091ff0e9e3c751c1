"""Fetch the pretrained files a configuration needs; see `pid_diffusion.cli.fetch_weights` (`pid-fetch-weights`)."""

from pid_diffusion.cli.fetch_weights import main

if __name__ == "__main__":
    main()
