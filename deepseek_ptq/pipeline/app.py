"""The Hydra app: compose and validate the config, prepare the run directory, run the ranks."""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deepseek_ptq.common import choice
from deepseek_ptq.errors import UserError
from deepseek_ptq.pipeline import rundir
from deepseek_ptq.pipeline.config import register_schema
from deepseek_ptq.pipeline.launch import (
    JoinedRank,
    PeerLost,
    RankFailed,
    check_local_gpus,
    joined_rank,
    let_rank0_record_first,
    mark_stopped,
    rank_main,
    restore_signals,
    spawn,
    stop_on_signals,
    terminated,
)
from deepseek_ptq.pipeline.validate import validate

log = logging.getLogger("deepseek_ptq")
# The config groups ship inside the package (conf/ at the top of the source tree links here).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _config_summary(cfg: Any) -> dict[str, Any]:
    return {"world_size": cfg.parallel.world_size, "calib": choice(cfg.calib.name),
            "calib_experts_ratio": cfg.calib.experts_ratio, "quant": cfg.quant.name,
            "model": cfg.model.name, "ckpt_dir": cfg.model.ckpt_dir}


def execute(cfg: DictConfig, run_dir: Path) -> None:
    """Run one job in ``run_dir``; raises after recording ``status: failed`` on any error."""
    joined = joined_rank()
    rank = joined.rank if joined else 0
    world_size = cfg.parallel.world_size
    # SIGTERM / SIGINT stop the job, recorded; the spawning parent only notes the signal and stops its ranks.
    previous = stop_on_signals(run_dir if rank == 0 else None, interrupt=joined is not None or world_size == 1)
    try:
        _execute(cfg, run_dir, joined, rank, world_size)
    finally:
        restore_signals(previous)  # the job is over: the caller's handlers again
        _free_job_memory()
    stop = terminated()
    if stop is not None:  # (noted by the spawning parent after its ranks had finished: the run was still stopped)
        raise stop


def _free_job_memory() -> None:
    """What the job held, released before the next job of an in-process sweep loads its model.

    The model sits in reference cycles, which Python frees only at an occasional full collection: without
    this, one job's model (at 671B scale, its GPU memory) could still be there while the next one loads.
    malloc_trim hands the freed heap back to the system (glibc; elsewhere nothing to do).
    """
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _execute(cfg: DictConfig, run_dir: Path, joined: JoinedRank | None, rank: int, world_size: int) -> None:
    if rank == 0:
        rundir.write_metrics(run_dir, {"status": "running", **_config_summary(cfg)})
        rundir.setup_logging(run_dir, 0, cfg.log_level)
    try:
        if joined is not None and joined.world_size != world_size:
            raise UserError(f"parallel={cfg.parallel.name} asks for {world_size} ranks but the launcher started "
                            f"{joined.world_size}", fix=f"start {world_size} ranks or pick the matching parallel option")
        validate(cfg)  # every check that needs no weight, before any rank is spawned and any weight is read
    except UserError:
        let_rank0_record_first(rank)  # joined ranks all fail here; rank 0 writes metrics.json
        raise
    if joined is not None:
        rank_main(cfg, run_dir if rank == 0 else None, rank, world_size, joined.local_rank, "env://")
    elif world_size == 1:
        rank_main(cfg, run_dir, 0, 1, 0, "")
    else:
        check_local_gpus(choice(cfg.parallel.device), world_size)  # before any rank starts
        log.info("spawning %d ranks", world_size)
        spawn(cfg, run_dir)
        rundir.setup_logging(run_dir, 0, cfg.log_level)


register_schema()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    start = time.perf_counter()
    failed = False
    try:
        execute(cfg, run_dir)
    except BaseException as err:
        _record_failure(run_dir, err)  # returns only where a sweep goes on past this job
        failed = True
    if failed:
        _free_job_memory()  # the failure's traceback held the job's frames, its model among them, until here
        return
    joined = joined_rank()
    if joined is None or joined.rank == 0:
        print(f"deepseek-ptq: done in {time.perf_counter() - start:.1f} s -> {run_dir}", file=sys.stderr)


def _record_failure(run_dir: Path, err: BaseException) -> None:
    """``status: failed`` in metrics.json, then exit: 143 / 130 when stopped by SIGTERM / SIGINT, 1 for a user or rank error,
    the exception itself otherwise. In a sweep an ordinary failure ends only its job."""
    log = logging.getLogger("deepseek_ptq")
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    stop = terminated()
    if stop is not None:  # whatever the signal surfaced as (an extension may have replaced it): the run was stopped
        log.error("%s", stop.reason)  # (a rank that died first is the run's failure, not the signal)
        mark_stopped(run_dir, stop)
        sys.exit(stop.exit_code)  # 143 (SIGTERM) or 130 (SIGINT); a sweep ends here too
    rundir.mark_failed(run_dir, err)
    if isinstance(err, (UserError, RankFailed, PeerLost)):
        if not getattr(err, "logged", False):  # (a UserError a rank of this process said already)
            log.error("%s", err, exc_info=err, extra=rundir.BRIEF)  # the traceback in run.log only
        if not multirun:
            sys.exit(1)
    elif multirun and isinstance(err, Exception):
        log.exception("job failed")
    else:
        raise err
