"""Post-hoc EMA of a run folder (`pid-phema`, `pid-fid --run ... --phema-std`): the average of any relative std
at any snapshot step, reconstructed from the power-function EMAs its snapshots store (phema.py).

The inputs are every power-function EMA of every snapshot (or training state, for a step without a snapshot)
up to the chosen step, at time nimg = step · train.batch, listed by (nimg, σ_rel) as EDM2's
`reconstruct_phema.py` lists its pickles. The result is a file in the snapshot format, `phema-<step>.pt` beside
the snapshots, whose `ema` entries are the reconstructions `std-<σ_rel>`; `pid-sample --ema std-0.080` and
`pid-fid --checkpoint ... --ema std-0.080` read it like any snapshot. It also records which inputs and
coefficients made each average. Reconstructing other stds at the same step adds them to the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from pid_diffusion.user_error import FileFormatError, UserError
from pid_diffusion.training import checkpoint, phema
from pid_diffusion.utils import fileio

__all__ = ["NoPowerEMAError", "output_path", "reconstruct_run", "snapshot_inputs"]


class NoPowerEMAError(UserError, ValueError):
    """The run folder has no snapshot with power-function EMAs (at or before the asked step)."""


def output_path(run_dir: str, step: int) -> str:
    """Where the reconstructions at `step` are written by default: `<run>/phema-<step:08d>.pt`."""
    return fileio.join(run_dir, f"phema-{step:08d}.pt")


def snapshot_inputs(run_dir: str, step: int | None = None) -> tuple[int, list[tuple[int, float, str]]]:
    """(the output step, the inputs as (nimg, σ_rel, path) sorted by (nimg, σ_rel)): every power-function EMA
    of the run's weight files up to `step` (default: the newest step that has any)."""
    found = []
    for file_step, path in checkpoint.find_weights(run_dir):
        try:
            header = checkpoint.read_header(path)
        except Exception as error:  # torch.load raises many kinds; a damaged input would change every average.
            raise FileFormatError(f"{path} cannot be read ({type(error).__name__}: {error}); the reconstruction needs "
                             "every snapshot: restore it, or move it out of the folder") from None
        stds = sorted(phema.std_of(name) for name in header["ema"] if phema.is_std_name(name))
        if stds and file_step > 0:
            found.append((file_step, header["config"]["train"]["batch"], stds, path))
    if not found:
        raise NoPowerEMAError(f"no snapshot in {run_dir} holds power-function EMAs: train with "
                              "--train.phema_stds=0.050,0.100 (EDM2's pair) to keep them")
    steps = [file_step for file_step, *_ in found]
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise NoPowerEMAError(f"{run_dir} has no snapshot of step {step} with power-function EMAs; it has steps "
                              f"{', '.join(map(str, steps))}")
    batches = {batch for _, batch, _, _ in found}
    if len(batches) > 1:
        raise FileFormatError(f"the snapshots of {run_dir} were trained with different train.batch {sorted(batches)}: "
                         "their times in images cannot be told from their steps")
    inputs = [(file_step * batch, std, path) for file_step, batch, stds, path in found if file_step <= step
              for std in stds]
    return step, inputs


def _states(inputs: Sequence[tuple[int, float, str]]) -> Iterator[tuple[int, float, dict[str, torch.Tensor]]]:
    """The inputs' state dicts in order, each file read once."""
    loaded_path, loaded = None, None
    for nimg, std, path in inputs:
        if path != loaded_path:
            loaded_path, loaded = path, fileio.torch_load(path)
        yield nimg, std, loaded["ema"][phema.std_name(std)]


def reconstruct_run(run_dir: str, stds: Sequence[float], step: int | None = None, out: str | None = None,
                    log=print) -> str:
    """Reconstruct the averages at σ_rel `stds` at snapshot `step` (default: the newest) and write them to `out`
    (default `output_path`), keeping the reconstructions of other stds already there; returns the path."""
    step, inputs = snapshot_inputs(run_dir, step)
    stds = sorted(set(stds))
    out = out or output_path(run_dir, step)
    coefs = phema.solve_posthoc_coefficients([nimg for nimg, _, _ in inputs], [std for _, std, _ in inputs],
                                             inputs[-1][0], stds)
    log(f"Reconstructing σ_rel {', '.join(f'{std:.3f}' for std in stds)} at step {step} from {len(inputs)} "
        f"power-function EMAs of {len({path for *_, path in inputs})} file(s)")
    target = fileio.torch_load(inputs[-1][2])
    with torch.device("meta"):  # Only the buffer names: nothing is allocated.
        buffers = {name for name, _ in checkpoint.build_model(target["model_spec"]).named_buffers()}
    averages = phema.reconstruct(_states(inputs), coefs, buffers)

    previous = fileio.torch_load(out) if fileio.exists(out) else None
    if previous is not None and previous["step"] != step:
        raise FileFormatError(f"{out} holds reconstructions at step {previous['step']}, not {step}: name another output")
    ema = dict(previous["ema"]) if previous else {}
    sources = dict(previous["phema"]) if previous else {}
    for j, (std, average) in enumerate(zip(stds, averages)):
        ema[phema.std_name(std)] = average
        sources[phema.std_name(std)] = {"nimg": [nimg for nimg, _, _ in inputs], "std": [s for _, s, _ in inputs],
                                        "coefs": coefs[:, j].tolist()}
    fileio.atomic_torch_save({"step": step, "config": target["config"], "model_spec": target["model_spec"],
                              "model": target["model"], "ema": dict(sorted(ema.items())), "phema": sources}, out)
    return out
