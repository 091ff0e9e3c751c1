"""The shell commands of README.md and docs/*.md, and how tests/test_docs.py runs each at a reduced size.

Also the `mpirun` stand-in the launcher scripts (`bash scripts/*.sh`) find first on PATH during that test:
run as a program, it drops mpirun's own options and runs the command once, reduced like the others.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Reduced sizes, replacing the documented values. Configuration overrides (`--section.key=value`):
DISTILL_REDUCTIONS = {"train.steps": "1", "train.batch": "2", "train.micro_batch": "none", "pid.metric": "l2",
                      "pid.num_points": "10", "run.image_every": "0", "train.precision": "fp32"}
TEACHER_TRAINING_REDUCTIONS = {"train.steps": "1", "train.batch": "2", "run.image_every": "0",
                               "data.num_images": "8"}
# argparse options (the last occurrence of an option wins, so these are appended):
ARGPARSE_REDUCTIONS = {
    "pid-sample": ["--seeds", "0-1", "--batch", "2"],
    "pid-fid": ["--batch", "10"],
    "pid-fid-ref": ["--batch", "10"],
    "pid-fit-dode": ["--multiplier", "2", "--num-samples", "2"],
    "pid-demo": ["--eval-images", "2", "--fid-images", "2"],
}
STEPS_REDUCTION = ["--steps", "2"]  # pid-sample with a documented --steps (Heun's 18, Euler's 250)
FID_SEEDS_REDUCTION = ["--seeds", "0-9"]  # pid-fid of generated images: 10 (the Inception Score's splits)
REFERENCE_IMAGES_REDUCTION = ["--num-images", "10"]  # pid-fid-ref --data

# Every console script, its module, and its scripts/ wrapper.
MODULES = {"pid-demo": "demo", "pid-distill": "distill", "pid-train-teacher": "train_teacher",
           "pid-convert-edm": "convert_edm", "pid-sample": "sample", "pid-fid": "fid", "pid-fid-ref": "fid_ref",
           "pid-fit-dode": "fit_dode", "pid-plot": "plot", "pid-fetch-weights": "fetch_weights", "pid-phema": "phema"}
SCRIPTS = {"scripts/distill.py": "pid-distill", "scripts/train_teacher.py": "pid-train-teacher",
           "scripts/convert_edm.py": "pid-convert-edm", "scripts/image_sample.py": "pid-sample",
           "scripts/fid_evaluation.py": "pid-fid", "scripts/fid_ref.py": "pid-fid-ref",
           "scripts/fit_dode.py": "pid-fit-dode", "scripts/fetch_weights.py": "pid-fetch-weights",
           "scripts/phema.py": "pid-phema"}
_MPIRUN_OPTIONS_WITH_VALUE = {"-np", "-n", "--bind-to", "-x", "--hostfile", "--map-by"}


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every command line of every ```bash block, continuation lines joined,
    comments dropped, `a && b` split; each distinct command once."""
    found: dict[str, str] = {}
    for document in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", document.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                command = []
                for word in [*words, "&&"]:
                    if word != "&&":
                        command.append(word)
                    elif command:
                        found.setdefault(shlex.join(command), document.name)
                        command = []
    return [(document, command) for command, document in found.items()]


def _config_reduced(arguments: list[str], reductions: dict[str, str]) -> list[str]:
    def reduced_key(argument: str) -> bool:
        key = argument[2:].split("=", 1)[0]
        return argument.startswith("--") and "=" in argument and any(
            full == key or full.endswith("." + key) for full in reductions)
    return [a for a in arguments if not reduced_key(a)] + [f"--{key}={value}" for key, value in reductions.items()]


def reduced(command: str, arguments: list[str]) -> list[str]:
    """The arguments of console script `command` at the reduced size."""
    if command in ("pid-distill", "pid-demo"):
        arguments = _config_reduced(arguments, DISTILL_REDUCTIONS)
    elif command == "pid-train-teacher":
        arguments = _config_reduced(arguments, TEACHER_TRAINING_REDUCTIONS)
    if command == "pid-sample" and "--steps" in arguments:
        arguments = [*arguments, *STEPS_REDUCTION]
    if command == "pid-fid" and "--images" not in arguments:  # images are scored as given; others generated
        arguments = [*arguments, *FID_SEEDS_REDUCTION]
    if command == "pid-fid-ref" and "--data" in arguments:  # --compare reads two files, no images
        arguments = [*arguments, *REFERENCE_IMAGES_REDUCTION]
    return [*arguments, *ARGPARSE_REDUCTIONS.get(command, [])]


def without_mpirun(words: list[str]) -> list[str]:
    """The command mpirun would start, without mpirun and its options."""
    index = 1
    while index < len(words) and words[index].startswith("-"):
        index += 2 if words[index] in _MPIRUN_OPTIONS_WITH_VALUE else 1
    return words[index:]


def _stub_main(argv: list[str]) -> None:
    """mpirun stand-in: `python -m pid_diffusion.cli.<module> ARGS` runs once, in this process, reduced."""
    words = without_mpirun(["mpirun", *argv])
    if words[:2] != [words[0], "-m"] or not words[2].startswith("pid_diffusion.cli."):
        raise SystemExit(f"mpirun stand-in: cannot run {words}; the launchers start python -m pid_diffusion.cli.*")
    module = words[2].rsplit(".", 1)[1]
    command = next(name for name, value in MODULES.items() if value == module)
    sys.argv = [command, *reduced(command, words[3:])]
    import importlib
    importlib.import_module(words[2]).main(sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _stub_main(sys.argv[1:])
