"""One process group under `mpirun`, `torchrun`, `srun` or plain `python`.

The launcher is recognised from its environment: Open MPI / MPICH / Intel MPI set `OMPI_COMM_WORLD_SIZE`
or `PMI_SIZE` (rank, size and local rank then come from the MPI communicator, and rank 0 broadcasts the
rendezvous address over MPI), torchrun sets `RANK`, `WORLD_SIZE` and `LOCAL_RANK`, a SLURM job step
(`srun`, without an MPI library in between) sets `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` and
`SLURM_STEP_ID` (the batch script itself has no step id, so a plain `python` there is one process), and
anything else is a single process. Under srun the rendezvous is `MASTER_ADDR:MASTER_PORT` when set, else
the first host of `SLURM_JOB_NODELIST` and a port derived from `SLURM_JOB_ID` (every rank computes the
same address without talking to the others).

The device is `cuda:<local rank>` when CUDA is present (never a fixed number of GPUs per node), the CPU
otherwise; the backend is NCCL on GPUs and gloo on the CPU.

The rank helpers work before `init()` (they read the launcher's environment), so a script can decide
what to print or write before it builds the process group.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import functools
import os
import socket
import sys
import traceback
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist

__all__ = [
    "JobExit",
    "Launcher",
    "abort_on_error",
    "all_gather_tensors",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "device",
    "first_host",
    "init",
    "is_initialized",
    "launcher",
    "local_rank",
    "print0",
    "rank",
    "shutdown",
    "world_size",
]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)  # A collective that waits longer than this fails the job.

_MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # Open MPI; MPICH and Intel MPI (Hydra).
_MPI_LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")


class Launcher(enum.Enum):
    """How this process was started."""

    MPI = "mpi"
    TORCHRUN = "torchrun"
    SLURM = "slurm"
    SINGLE = "single"


_SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")
# Without MASTER_PORT, an srun job rendezvous on port BASE + job id mod RANGE: unprivileged, below Linux's
# ephemeral range (32768+), and different for jobs that share a node unless their ids agree mod RANGE.
_SLURM_PORT_BASE, _SLURM_PORT_RANGE = 12000, 20000


def launcher() -> Launcher:
    """The launcher, from its environment variables. MPI first (mpirun may also export RANK, and inside a
    SLURM allocation every process sees SLURM variables), then torchrun, then an srun step."""
    if any(name in os.environ for name in _MPI_SIZE_VARIABLES):
        return Launcher.MPI
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Launcher.TORCHRUN
    if all(name in os.environ for name in _SLURM_VARIABLES):
        return Launcher.SLURM
    return Launcher.SINGLE


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, compressed or not: `node[01-04,07],gpu1` → `node01`,
    `rack[1-2]-n[3-4]` → `rack1-n3`."""
    host, position = [], 0
    while position < len(nodelist) and nodelist[position] != ",":
        if nodelist[position] == "[":
            end = nodelist.find("]", position)
            if end < 0:
                raise ValueError(f"SLURM host list {nodelist!r} has an unclosed '['")
            host.append(nodelist[position + 1:end].split(",")[0].split("-")[0])
            position = end + 1
        else:
            host.append(nodelist[position])
            position += 1
    if not host or not "".join(host).strip():
        raise ValueError(f"SLURM host list {nodelist!r} names no host")
    return "".join(host).strip()


def _slurm_rendezvous() -> str:
    """`tcp://host:port` of an srun job, the same on every rank (module docstring)."""
    host = os.environ.get("MASTER_ADDR") or first_host(os.environ["SLURM_JOB_NODELIST"])
    port = os.environ.get("MASTER_PORT") or _SLURM_PORT_BASE + int(os.environ["SLURM_JOB_ID"]) % _SLURM_PORT_RANGE
    return f"tcp://{host}:{port}"


def _mpi():
    from mpi4py import MPI  # Imported only under mpirun: importing it initialises MPI.

    return MPI


@functools.cache
def _rank_and_size() -> tuple[int, int]:
    kind = launcher()
    if kind is Launcher.MPI:
        comm = _mpi().COMM_WORLD
        return comm.Get_rank(), comm.Get_size()
    if kind is Launcher.TORCHRUN:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if kind is Launcher.SLURM:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 1


@functools.cache
def _local_rank() -> int:
    kind = launcher()
    if kind is Launcher.MPI:
        for name in _MPI_LOCAL_RANK_VARIABLES:
            if name in os.environ:
                return int(os.environ[name])
        # No launcher variable: ranks sharing memory share a node, and their rank in that sub-communicator
        # is the local rank. Split_type is collective; `init()` calls it on every rank.
        MPI = _mpi()
        node_comm = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        local = node_comm.Get_rank()
        node_comm.Free()
        return local
    if kind is Launcher.TORCHRUN:
        return int(os.environ.get("LOCAL_RANK", "0"))
    if kind is Launcher.SLURM:
        return int(os.environ.get("SLURM_LOCALID", "0"))
    return 0


def rank() -> int:
    """Global rank of this process (0 in a single process); valid before `init()`."""
    return _rank_and_size()[0]


def world_size() -> int:
    """Number of processes in the job; valid before `init()`."""
    return _rank_and_size()[1]


def local_rank() -> int:
    """Rank among the processes on this node, as the launcher reports it; selects the GPU."""
    return _local_rank()


def device() -> torch.device:
    """`cuda:<local rank>` when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank() >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank()} but only {torch.cuda.device_count()} GPU(s) visible on this "
                           f"node: start at most one process per GPU")
    return torch.device("cuda", local_rank())


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous_over_mpi() -> str:
    """Rank 0 picks its host name and a free port and broadcasts them over MPI: `tcp://host:port`."""
    comm = _mpi().COMM_WORLD
    address = None
    if comm.Get_rank() == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        port = int(os.environ.get("MASTER_PORT") or _free_port())
        address = (host, port)
    host, port = comm.bcast(address, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    return f"tcp://{host}:{port}"


def init(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
    """Create the default process group once; later calls do nothing.

    `timeout` bounds every collective, so a rank that dies or hangs ends the job instead of leaving the
    others waiting forever.
    """
    if is_initialized():
        return
    dev = device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    common = dict(backend=backend, rank=rank(), world_size=world_size(), timeout=timeout)
    kind = launcher()
    if kind is Launcher.MPI:
        torch_dist.init_process_group(init_method=_rendezvous_over_mpi(), **common)
    elif kind is Launcher.TORCHRUN:
        torch_dist.init_process_group(init_method="env://", **common)
    elif kind is Launcher.SLURM:
        torch_dist.init_process_group(init_method=_slurm_rendezvous(), **common)
    else:
        # A one-process group needs no rendezvous: an in-memory store avoids picking a port.
        torch_dist.init_process_group(store=torch_dist.HashStore(), **common)


def shutdown() -> None:
    """Destroy the process group (if any), so the process exits without the group's warnings."""
    if is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (any picklable value) on every rank."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (a new tensor; the input is left alone).

    Exact for integer counts and in the input's dtype (float64 sums stay float64), unlike a mean times the
    world size. The tensor must be on `device()` (NCCL reduces GPU tensors only).
    """
    result = tensor.detach().clone()
    if is_initialized() and world_size() > 1:
        torch_dist.all_reduce(result, op=torch_dist.ReduceOp.SUM)
    return result


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor`, in rank order, on every rank; first dimensions may differ between ranks.

    The other dimensions and the dtype must agree. Each rank pads its tensor to the longest first dimension
    (collectives need equal shapes), and the padding is cut off again.
    """
    if tensor.ndim == 0:
        raise ValueError("all_gather_tensors gathers along the first dimension: reshape a scalar to shape [1]")
    if not (is_initialized() and world_size() > 1):
        return [tensor.detach().clone()]
    lengths = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(world_size())]
    torch_dist.all_gather(lengths, torch.tensor([len(tensor)], dtype=torch.int64, device=tensor.device))
    lengths = [int(length) for length in lengths]
    padded = tensor.detach().new_zeros((max(lengths), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    shards = [torch.empty_like(padded) for _ in lengths]
    torch_dist.all_gather(shards, padded)
    return [shard[:length] for shard, length in zip(shards, lengths)]


class JobExit(SystemExit):
    """An exit that every rank takes at the same point (preemption): `abort_on_error` lets it end each
    process with its status instead of aborting the job."""


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


@contextlib.contextmanager
def abort_on_error() -> Iterator[None]:
    """End the whole job when this rank fails, instead of leaving the other ranks in a collective.

    A `JobExit` (every rank stopping at the same point) destroys the process group and re-raises. Otherwise a
    single process re-raises as usual; in a multi-process job the traceback is printed with the rank,
    then MPI_Abort (under mpirun) or `os._exit(1)` (torchrun, whose agent then stops the other workers)
    ends this process with a non-zero status without running exit handlers that could block.
    """
    try:
        yield
    except BaseException as error:
        if isinstance(error, JobExit) or (isinstance(error, SystemExit) and not error.code):
            # Every rank leaves here together: the group's worker threads must end before the interpreter does
            # (a Gloo thread still holding a tensor at finalization aborts the process, and mpirun then kills
            # the ranks that were about to exit cleanly).
            shutdown()
            raise
        if world_size() == 1:
            raise
        print(f"[rank {rank()}] aborting the job", file=sys.stderr)
        if not isinstance(error, SystemExit):  # argparse has already printed its message.
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if launcher() is Launcher.MPI:
            _mpi().COMM_WORLD.Abort(1)
        os._exit(1)
