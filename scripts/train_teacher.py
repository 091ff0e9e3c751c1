"""Train an EDM teacher on the generated shapes data set; see `pid_diffusion.cli.train_teacher`
(`pid-train-teacher`)."""

from pid_diffusion.cli.train_teacher import main

if __name__ == "__main__":
    main()
