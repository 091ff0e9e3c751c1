"""The command-line options the commands share, in one place: the training commands' configuration
(`--preset`, `--config`, `--dry-run`, `--section.key=value` overrides), and the seed lists, networks,
samplers and weights of the sampling and evaluation commands.
"""

from __future__ import annotations

import argparse
import functools
import ast
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from pid_diffusion import config_files, official, samplers
from pid_diffusion.training import checkpoint, disk_plan, phema
from pid_diffusion.utils import dist, fileio
from pid_diffusion.cli import errors
from pid_diffusion.user_error import UserError
from pid_diffusion.config import (ConfigError, OnResume, TrainingConfig, flatten, leaf_fields, on_resume,
                                  parse_overrides, to_dict, to_json)
from pid_diffusion.evaluation import NO_EMA
from pid_diffusion.generate import SamplerKind, sampler_for
from pid_diffusion.grid import NUM_POINTS
from pid_diffusion.guidance import GuidedDenoiser
from pid_diffusion.training.launch import describe_launch
from pid_diffusion.teacher import load_teacher

__all__ = ["add_configuration_source", "add_guide_arguments", "add_model_arguments", "add_sampler_arguments",
           "check_guide_arguments", "configuration_help", "dry_run", "field_docs", "launch_check", "load_guided_teacher",
           "load_model",
           "parse_int_list", "parse_training", "sampler_from_args", "seed_range", "training_parser", "weights_name"]

C = TypeVar("C")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser that shows a command's module docstring as its help text."""
    return errors.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


# ----------------------------------------------------------------------------------------------------------
# Training commands: a configuration from a preset or a file, with overrides.


@functools.cache  # Read once per process: every training command's parser shows them all (inspect is slow).
def field_docs(cls: type) -> dict[str, str]:
    """The one-line comment beside each field declared in `cls`'s own source: the schema (config.py) documents
    itself, and `--help` prints it. Callers must not modify the result (it is cached)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # Defined where no source is kept (an interactive session).
        return {}
    lines = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            lines[token.start[0]] = token.string.lstrip("#").strip()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment = lines.get(node.end_lineno) or lines.get(node.lineno)
            if comment:
                docs[node.target.id] = comment
    return docs


def configuration_help(schema: type, task: str) -> str:
    """Every configuration key with its default and meaning (the schema's comments), and whether it may
    change on resume: the epilog of a training command's --help."""
    preset = config_files.read_config_file(config_files.preset_file(task, "default"))
    defaults, preset_values = flatten(to_dict(schema())), flatten(preset)
    lines = ["configuration (--section.key=value; default: the paper's CIFAR-10 run, [default preset: ...] where",
             "the `default` preset, used without --preset or --config, differs; [resume: ...] whether a resumed",
             "run may change it):"]
    docs: dict[type, dict[str, str]] = {}
    for key, section, field in leaf_fields(schema):
        doc = docs.setdefault(section, field_docs(section)).get(field.name, "")
        value = f"--{key}={_shown(defaults[key])}"
        preset_note = f" [default preset: {_shown(preset_values[key])}]" if key in preset_values else ""
        resume = on_resume(field)
        resume_note = "" if resume is OnResume.MATCH else f" [resume: {resume.value}]"
        lines.append(f"  {value}\n      {doc}{preset_note}{resume_note}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(_shown(item) for item in value)
    return str(value)


def add_configuration_source(parser: argparse.ArgumentParser, task: str) -> None:
    """--preset or --config: where a configuration of `task` starts (`parse_training` reads it)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=config_files.preset_names(task),
                        help=f"the preset to start from, configs/{task}/<name>.json (default: default)")
    source.add_argument("--config", metavar="FILE",
                        help="a configuration file to start from: a preset's, your own, or a run folder's config.json")


def training_parser(prog: str, description: str | None, task: str, schema: type) -> argparse.ArgumentParser:
    """A parser with the options every training command shares: --preset or --config, and --dry-run; its help
    lists every key of `schema`.

    Commands add their own arguments; `parse_training` reads the configuration overrides from the rest.
    """
    result = parser(prog, description)
    result.epilog = configuration_help(schema, task)
    add_configuration_source(result, task)
    result.add_argument("--dry-run", action="store_true",
                        help="print the resolved configuration, then check the launch (batch split over this job's "
                             "ranks, input files, the run folder) without loading anything, and exit")
    return result


def parse_training(parser: argparse.ArgumentParser, schema: type[C], task: str,
                   argv: Sequence[str] | None) -> tuple[argparse.Namespace, C]:
    """The parsed arguments and the configuration they name, the remaining `--key=value` overrides applied;
    a configuration error exits through `parser.error`, naming the key."""
    args, rest = parser.parse_known_args(argv)
    try:
        path = args.config or config_files.preset_file(task, args.preset or "default")
        return args, config_files.load(schema, path, parse_overrides(rest))
    except ConfigError as error:
        parser.error(str(error))


def dry_run(args: argparse.Namespace, config: Any) -> bool:
    """With --dry-run: print the resolved configuration (rank 0) and return True; the command then stops."""
    if args.dry_run:
        dist.print0(to_json(config), end="")
    return args.dry_run


def launch_check(args: argparse.Namespace, config: TrainingConfig, network_size: Callable[[], tuple[int, str]],
                 check_files: Callable[[], list[str]] = list) -> list[str] | None:
    """The checks before every training run, reading no weights: the batch split over this job's ranks and what
    the run folder would do (`launch.describe_launch`), the input files (`check_files`: the error the run would
    give, or one line per file found) and the disk its snapshots and training states take over the run
    (`disk_plan`, for one network of `network_size()`: bytes and where they come from). A mistake ends the command
    here, before the run folder is touched. Returns the report's lines; with --dry-run it prints the resolved
    configuration (stdout: a configuration file, `--dry-run > mine.json`) and the report (stderr), and returns
    None: the command stops."""
    dry = dry_run(args, config)
    report = [*describe_launch(config, dist.world_size()), *check_files(), *disk_plan.describe(config, *network_size())]
    if not dry:
        return report
    dist.print0("\n".join(["launch check:", *report]), file=sys.stderr)
    return None


# ----------------------------------------------------------------------------------------------------------
# Seeds, networks, samplers and weights: the sampling and evaluation commands.


def parse_int_list(text: str) -> list[int]:
    """EDM's integer lists: '0-63' or '1,2,5-10' (ranges inclusive)."""
    values = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if match and int(match[1]) <= int(match[2]):
            values.extend(range(int(match[1]), int(match[2]) + 1))
        elif part.isdigit():
            values.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a list of non-negative integers and ranges such as '0-63' or '1,2,5-10'")
    return values


def seed_range(text: str) -> tuple[str, list[int]]:
    """A seed range as written (for the results table) and its seeds, each used once."""
    seeds = parse_int_list(text)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seed range {text} lists a seed twice")
    return text, seeds


def weights_name(text: str) -> str:
    """'none', an EMA rate written as the checkpoint's `ema` keys write it (str of the float), or a power-function
    EMA or post-hoc reconstruction as 'std-<σ_rel>' (written as phema.std_name writes it)."""
    if text == NO_EMA:
        return text
    if phema.is_std_name(text):
        try:
            return phema.std_name(phema.std_of(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: a power-function EMA is named std-<relative std>, "
                                             "e.g. std-0.050") from None
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0 < rate < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an EMA rate in (0, 1) nor '{NO_EMA}'")
    return str(rate)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint/--ema or --teacher/--preset: where the network comes from."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="snapshot or training state (a PID student or an EDM network), a run "
                                             "folder (its newest one that loads), or a student file of the official "
                                             "PID code with --preset")
    source.add_argument("--teacher", help="teacher: EDM .pkl, converted teacher .pt, or a state dict with --preset")
    parser.add_argument("--ema", type=weights_name, help="EMA to sample from: a rate, e.g. 0.9999, or a power-function "
                        "EMA or post-hoc reconstruction, e.g. std-0.050 (default: the trained weights)")
    parser.add_argument("--preset", help="EDM preset naming a plain state dict's architecture (a teacher's, or an "
                                         "official PID student's)")
    add_guide_arguments(parser)


def add_guide_arguments(parser: argparse.ArgumentParser) -> None:
    """--guide/--guidance: the teacher of --teacher guided by a second network (`load_guided_teacher`)."""
    parser.add_argument("--guide", help="a guide for --teacher (EDM2's autoguidance or unconditional model): "
                                        "D_g + w (D - D_g) at every step, with w from --guidance")
    parser.add_argument("--guidance", type=float, help="w of --guide (EDM2's; 1: the teacher alone)")


def check_guide_arguments(args: argparse.Namespace) -> None:
    """--guide and --guidance go together, and guide a teacher: the errors before anything is loaded."""
    if (args.guide is None) != (args.guidance is None):
        raise UserError("--guide and --guidance go together: give both or neither")
    if args.guide is not None and args.teacher is None:
        raise UserError("--guide and --guidance apply to a teacher (--teacher), whose sampler they guide: drop them")


def load_guided_teacher(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The teacher of --teacher (and --preset), guided by --guide with weight --guidance where they are given
    (`GuidedDenoiser`, which refuses a guide of another family or data space), in eval mode on `device`."""
    check_guide_arguments(args)
    teacher = load_teacher(args.teacher, preset=args.preset, device=device)
    if args.guide is None:
        return teacher
    return GuidedDenoiser(teacher, load_teacher(args.guide, device=device), args.guidance)


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler/--steps or --sampler-file: how the network is sampled."""
    parser.add_argument("--sampler", type=SamplerKind, choices=list(SamplerKind), metavar="{onestep,heun,euler}",
                        help="default: onestep for a PID student, heun for a denoiser")
    parser.add_argument("--steps", type=int,
                        help=f"heun: Karras steps (EDM default 18); euler: points of PID's grid (default {NUM_POINTS})")
    parser.add_argument("--sampler-file", metavar="PATH",
                        help="a D-ODE sampler written by pid-fit-dode, for a denoiser (instead of --sampler/--steps)")


def sampler_from_args(args: argparse.Namespace, network: str) -> samplers.Sampler:
    """The sampler add_sampler_arguments' options name for a network of class `network` (generate.sampler_for)."""
    return sampler_for(network, args.sampler, args.steps, args.sampler_file)


def load_model(args: Any, device: torch.device) -> nn.Module:
    """The network named by add_model_arguments' options, in eval mode on `device`."""
    if args.teacher is not None:
        if args.ema is not None:
            raise UserError("--ema applies to a training checkpoint; a teacher file holds one network")
        return load_guided_teacher(args, device)
    check_guide_arguments(args)  # a guide without a teacher
    ema = None if args.ema == NO_EMA else args.ema
    if fileio.isdir(args.checkpoint):  # A run folder: its newest file that loads, damaged newer ones named.
        path, net = checkpoint.newest_generator(args.checkpoint, ema_rate=ema, device=device, log=dist.print0)
        dist.print0(f"Sampling {path}")
        return net
    return official.load_network(args.checkpoint, preset=args.preset, ema_rate=ema, device=device)
