"""Ranks and process groups: spawn W local ranks, or join the ranks torchrun / srun started.

A rank that raises records the failure (metrics.json "failed", its traceback in its log) and exits
non-zero; the spawner or torchrun then ends the others. Every collective is bounded by parallel.timeout_s.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from deepseek_ptq.common import choice
from deepseek_ptq.errors import UserError
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.pipeline import rundir
from deepseek_ptq.pipeline.metrics import RunMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinedRank:
    rank: int
    world_size: int
    local_rank: int


def joined_rank() -> JoinedRank | None:
    """The rank this process was started as by torchrun or srun, or None when run by hand."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return JoinedRank(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return JoinedRank(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return None


class Terminated(BaseException):
    """The launcher stopped this rank (torchrun and srun send SIGTERM to the others when one rank fails)."""


_terminated: Terminated | None = None


def stop_on_sigterm(run_dir: Path | None) -> Any:
    """Turn SIGTERM into an exception, so a joined rank (or a one-process run stopped by SLURM or ``timeout``)
    records ``failed`` and closes W&B instead of vanishing with metrics.json still saying ``running``.

    The failure is recorded in the handler itself: a C extension that is calling back into Python when the
    signal lands may turn the exception into one of its own (safetensors raised a ValueError in a CI run).
    Returns the handler it replaced, for the caller to put back when the run ends.
    """

    def _raise(signum: int, _frame: Any) -> None:
        global _terminated
        err = Terminated(f"stopped by signal {signum} (another rank failed, or the launcher was stopped)")
        if _terminated is None:
            _terminated = err
            if run_dir is not None:
                rundir.mark_failed(run_dir, err)
        raise err

    return signal.signal(signal.SIGTERM, _raise)


def terminated() -> Terminated | None:
    """The SIGTERM this process received, if any (whatever exception it surfaced as)."""
    return _terminated


def let_rank0_record_first(rank: int) -> None:
    """Before a check every rank fails on its own (no process group yet), ranks other than 0 wait a moment:
    torchrun ends every rank as soon as one exits, and rank 0 is the one that writes metrics.json."""
    if rank != 0:
        time.sleep(3.0)


def uses_cuda(device: str) -> bool:
    """parallel.device resolved: cuda when asked for, or auto with a visible GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("parallel.device=cuda but no CUDA device is visible", fix="use parallel.device=cpu or auto")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def check_local_gpus(device: str, ranks_on_node: int) -> None:
    """Each rank of a node needs a GPU of its own (NCCL refuses two ranks on one device, after the spawn)."""
    if uses_cuda(device) and ranks_on_node > torch.cuda.device_count():
        raise UserError(f"{ranks_on_node} ranks on this node need {ranks_on_node} GPUs, {torch.cuda.device_count()} "
                        "visible", fix="start at most one rank per GPU, or set parallel.device=cpu")


def pick_device(device: str, local_rank: int) -> torch.device:
    if not uses_cuda(device):
        return torch.device("cpu")
    check_local_gpus(device, local_rank + 1)
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(device: torch.device, rank: int, world_size: int, timeout_s: float, init_method: str) -> None:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def rank_main(cfg: Any, run_dir: Path | None, rank: int, world_size: int, local_rank: int, init_method: str) -> None:
    """Everything one rank does, with its failure recorded before it leaves.

    ``run_dir`` None: a joined rank other than 0, which takes global rank 0's run directory.
    """
    from deepseek_ptq.pipeline.job import run_rank

    try:
        device = pick_device(choice(cfg.parallel.device), local_rank)
        if device.type == "cpu" and joined_rank() is None and world_size > 1:
            # Local CPU ranks share the cores: oversubscribed threads make every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if world_size > 1:
            _init_group(device, rank, world_size, cfg.parallel.timeout_s, init_method)
            shared = [str(run_dir) if rank == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            run_dir = Path(shared[0])
        assert run_dir is not None
        rundir.setup_logging(run_dir, rank, cfg.log_level)
        run_rank(cfg, run_dir, Parallel(rank, world_size, None), device)
    except BaseException as err:
        if isinstance(err, UserError):  # the problem and its fix say it all (metrics.json keeps the traceback)
            log.error("rank %d failed: %s", rank, err, exc_info=err, extra=rundir.BRIEF)  # (traceback: the log file)
        else:
            log.error("rank %d failed: %s\n%s", rank, err, traceback.format_exc())
        if run_dir is not None:
            rundir.mark_failed(run_dir, err, rank)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned(local_rank: int, cfg_yaml: str, run_dir: str, world_size: int, init_method: str) -> None:
    cfg = OmegaConf.create(cfg_yaml)
    rank_main(cfg, Path(run_dir), local_rank, world_size, local_rank, init_method)


def spawn(cfg: Any, run_dir: Path) -> None:
    """Start parallel.world_size local ranks and wait; any rank's failure ends them all."""
    world_size = cfg.parallel.world_size
    init_method = f"tcp://127.0.0.1:{cfg.parallel.master_port or free_port()}"
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    try:
        mp.start_processes(_spawned, args=(cfg_yaml, str(run_dir), world_size, init_method), nprocs=world_size,
                           join=True, start_method="spawn")
    except mp.ProcessRaisedException as err:
        failed = RunMetrics.read(run_dir)
        raise RankFailed(failed.failed_rank if failed and failed.failed_rank is not None else err.error_index,
                         failed.error if failed and failed.error else str(err)) from None
    except mp.ProcessExitedException as err:
        rundir.mark_failed(run_dir, f"rank {err.error_index} exited with code {err.exit_code}", err.error_index)
        raise RankFailed(err.error_index, f"exited with code {err.exit_code}") from None


class RankFailed(RuntimeError):
    def __init__(self, rank: int, error: str) -> None:
        self.rank, self.error = rank, error
        super().__init__(f"rank {rank} failed: {error}")
