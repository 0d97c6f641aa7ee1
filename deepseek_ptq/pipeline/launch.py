"""Ranks and process groups: spawn W local ranks, or join the ranks torchrun / srun started.

A rank that raises records the failure (metrics.json "failed", its traceback in its log) and exits
non-zero; the spawner or torchrun then ends the others. Every collective is bounded by parallel.timeout_s.
SIGTERM or SIGINT to any process of a run stops every rank and records the signal (stop_on_signals).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import socket
import sys
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(BaseException):
    """This process was told to stop: SIGTERM (torchrun or srun ending the other ranks after one failed, a
    scheduler's time limit, the spawning parent stopping its ranks) or SIGINT (Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        why = "Ctrl-C" if signum == signal.SIGINT else "another rank failed, or the launcher or a scheduler stopped the run"
        super().__init__(f"stopped by {signal.Signals(signum).name} (signal {signum}: {why})")
        # Set when the signal came after a rank on this host died unstopped (torchrun ending the survivors):
        # that rank's death, not the signal, is the run's failure.
        self.peer_lost: PeerLost | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return Terminated, (self.signum,)

    @property
    def reason(self) -> BaseException:
        """What the run failed of: the rank that died first, if one did, else this stop."""
        return self.peer_lost or self

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by the signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


_terminated: Terminated | None = None
_failing = False  # a failure is being recorded: the launcher's SIGTERM that follows it must not replace it


@dataclass(frozen=True)
class Team:
    """This rank's place in a started job: what its signal handler needs to tell a launcher ending the survivors
    of a killed rank from a stop meant for every rank."""

    run_dir: Path
    rank: int
    peers: list[Peer]


_team: Team | None = None
# run_dir/.stopped/rank{r}: rank r was told to stop (a signal). Its exit is then not a death to blame on it: a
# group's SIGTERM may end it before the survivor's handler runs.
STOPPED_DIR = ".stopped"


def join_team(team: Team) -> None:
    global _team
    _team = team


def leave_team() -> None:
    """From here on no peer's exit is a failure of the run: every rank is past its last collective (after the
    job's final gather, ranks other than 0 finish while rank 0 writes the results), or this rank is leaving."""
    global _team
    _team = None


def _told_to_stop(team: Team, rank: int) -> Path:
    return team.run_dir / STOPPED_DIR / f"rank{rank}"


def _note_told_to_stop(team: Team) -> None:
    try:
        path = _told_to_stop(team, team.rank)
        path.parent.mkdir(exist_ok=True)
        path.touch()
    except OSError:  # (a full or read-only disk: the survivors may blame this rank, which is all that is lost)
        pass


def _died_unstopped(team: Team, stop: Terminated) -> PeerLost | None:
    """A rank on this host whose process is gone though no signal told it to stop (SIGKILL, the OOM killer):
    torchrun's SIGTERM to the survivors follows it, and may come before a survivor's collective notices."""
    if rundir.read_metrics(team.run_dir).get("status") == "failed":  # (a rank that raised recorded why)
        return None
    for r in dead_peers(team.peers, team.rank, stop):  # (no wait: a signal is no lost connection)
        if not _told_to_stop(team, r).exists():
            return PeerLost(team.rank, stop, r, team.peers[r])
    return None


def stop_on_signals(run_dir: Path | None, interrupt: bool = True) -> dict[int, Any]:
    """Turn SIGTERM and SIGINT into ``Terminated``, so a run stopped by a launcher, a scheduler or Ctrl-C records
    ``failed`` (the signal named) and closes W&B instead of vanishing with metrics.json still saying ``running``.

    The failure is recorded in the handler itself: a C extension that is calling back into Python when the
    signal lands may turn the exception into one of its own (safetensors raised a ValueError in a CI run).
    Only the first signal raises: another one (the group's and the parent's forwarded one, Ctrl-C twice) must
    not interrupt the unwinding. ``interrupt=False`` only records it: the spawning parent polls ``terminated()``
    while it waits for its ranks, then stops them. Returns the handlers it replaced, for ``restore_signals``.
    """
    global _terminated, _failing
    _terminated, _failing = None, False

    def _stop(signum: int, _frame: Any) -> None:
        global _terminated
        if _terminated is not None or _failing:
            return
        stop = Terminated(signum)
        if _team is not None:
            _note_told_to_stop(_team)
            stop.peer_lost = _died_unstopped(_team, stop)
        _terminated = stop
        if run_dir is not None:
            mark_stopped(run_dir, stop)
        if interrupt:
            raise _terminated

    return {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}


def mark_stopped(run_dir: Path, stop: Terminated) -> None:
    """metrics.json for a stopped run: the rank that died first (``failed_rank``) if one did, else the signal."""
    rundir.mark_failed(run_dir, stop.reason, stop.peer_lost.rank if stop.peer_lost else None)


def restore_signals(previous: dict[int, Any]) -> None:
    """The handlers ``stop_on_signals`` replaced (the caller's again: a test process, whoever calls execute)."""
    for signum, handler in previous.items():
        # (None: a handler set outside Python, which cannot be put back; the default is the nearest)
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def terminated() -> Terminated | None:
    """The stop signal this process received, if any (whatever exception it surfaced as)."""
    return _terminated


def _recording_failure() -> None:
    global _failing
    _failing = True


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


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: what a survivor checks to name the rank that died under it."""

    host: str
    pid: int


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (dead, not yet reaped by its launcher) still takes signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: alive as far as can be told
        return False


# How gloo and NCCL say that the other end of a collective went away.
_LOST_CONNECTION = ("by peer", "Broken pipe", "remote process exited")


def _lost_connection(err: BaseException) -> bool:
    return any(words in str(err) for words in _LOST_CONNECTION)


def dead_peers(peers: list[Peer], rank: int, err: BaseException) -> list[int]:
    """The ranks on this host whose process has died. After a lost connection the check waits a moment: the
    kernel closes a killed process's sockets just before the process is gone."""
    host = socket.gethostname()
    local = [r for r, peer in enumerate(peers) if r != rank and peer.host == host]
    if not local:
        return []
    deadline = time.monotonic() + (2.0 if _lost_connection(err) else 0.0)
    while True:
        dead = [r for r in local if _dead(peers[r].pid)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


class PeerLost(RuntimeError):
    """A survivor's collective failed because a peer went away: the rank that died without recording why
    (killed, out of memory) when it ran on this host, else just that a peer was lost (gloo names its address)."""

    def __init__(self, survivor: int, error: BaseException, rank: int | None = None, peer: Peer | None = None) -> None:
        self.rank = rank
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if rank is None or peer is None:
            super().__init__(f"rank {survivor} lost a peer on another host (that rank's log says why): {first_line}")
        else:
            super().__init__(f"rank {rank} died (process {peer.pid} on {peer.host} ended without an error: killed, "
                             f"or out of memory); rank {survivor} lost it: {first_line}")


def record_rank_failure(err: BaseException, run_dir: Path | None, rank: int, peers: list[Peer]) -> BaseException:
    """Log and record (metrics.json) why this rank ends; returns the exception it ends with."""
    _recording_failure()
    stop = terminated()
    if stop is not None:  # whatever the stop surfaced as (a collective that a stopped peer left, ...)
        if rank != 0:  # (rank 0's stop is said once, by the process that records the run)
            log.info("rank %d %s", rank, stop.reason)
        if run_dir is not None:
            mark_stopped(run_dir, stop)
        return stop
    dead = dead_peers(peers, rank, err) if peers and not isinstance(err, UserError) else []
    remote = any(peer.host != socket.gethostname() for peer in peers)
    if dead or (remote and _lost_connection(err)):  # this rank's own "Connection reset by peer" blames it wrongly
        first = RunMetrics.read(run_dir) if run_dir is not None else None
        if first is not None and first.status == "failed":  # the peer recorded its failure: the run's error
            log.error("rank %d stopped: a peer failed first (%s)", rank, first.error)
            return err
        lost = (PeerLost(rank, err, dead[0], peers[dead[0]]) if dead else PeerLost(rank, err))
        lost = lost.with_traceback(err.__traceback__)
        log.error("%s", lost)
        if run_dir is not None:
            rundir.mark_failed(run_dir, lost, lost.rank)
        return lost
    if isinstance(err, UserError):  # the problem and its fix say it all (the traceback: the log file)
        log.error("rank %d failed: %s", rank, err, exc_info=err, extra=rundir.BRIEF)
        err.logged = True  # said once: the app does not repeat it when this process is the run's
    else:
        log.error("rank %d failed: %s\n%s", rank, err, traceback.format_exc())
    if run_dir is not None:
        rundir.mark_failed(run_dir, err, rank)
    return err


def rank_main(cfg: Any, run_dir: Path | None, rank: int, world_size: int, local_rank: int, init_method: str) -> None:
    """Everything one rank does, with its failure recorded before it leaves.

    ``run_dir`` None: a joined rank other than 0, which takes global rank 0's run directory.
    """
    from deepseek_ptq.pipeline.job import run_rank

    peers: list[Peer] = []
    try:
        device = pick_device(choice(cfg.parallel.device), local_rank)
        if device.type == "cpu" and joined_rank() is None and world_size > 1:
            # Local CPU ranks share the cores: oversubscribed threads make every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if world_size > 1:
            if rank == 0 and run_dir is not None:  # (a resumed run's old notes; no rank writes one before the gather)
                shutil.rmtree(run_dir / STOPPED_DIR, ignore_errors=True)
            _init_group(device, rank, world_size, cfg.parallel.timeout_s, init_method)
            shared = rundir.gather_to_all((Peer(socket.gethostname(), os.getpid()), str(run_dir) if rank == 0 else None),
                                          world_size)
            peers, run_dir = [peer for peer, _ in shared], Path(shared[0][1])
            join_team(Team(run_dir, rank, peers))
        assert run_dir is not None
        rundir.setup_logging(run_dir, rank, cfg.log_level)
        log.info("rank %d of %d: pid %d on %s", rank, world_size, os.getpid(), socket.gethostname())
        run_rank(cfg, run_dir, Parallel(rank, world_size, None), device)
    except BaseException as err:
        failure = record_rank_failure(err, run_dir, rank, peers)
        if failure is err:
            raise
        raise failure from (None if isinstance(failure, Terminated) else err)
    finally:
        leave_team()
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned(local_rank: int, cfg_yaml: str, run_dir: str, world_size: int, init_method: str) -> None:
    # A rank signalled itself (Ctrl-C or SIGTERM to the whole process group) stops as the parent does: quietly,
    # with the signal's exit code. Rank 0 records it too, in case the parent is gone (SIGKILL).
    stop_on_signals(Path(run_dir) if local_rank == 0 else None)
    cfg = OmegaConf.create(cfg_yaml)
    try:
        rank_main(cfg, Path(run_dir), local_rank, world_size, local_rank, init_method)
    except Terminated as stop:
        sys.exit(stop.exit_code)


def stop_ranks(processes: list[Any], grace_s: float) -> None:
    """SIGTERM to every rank still running; SIGKILL to any still there after ``grace_s`` (a rank blocked in a
    collective returns within the collective timeout). Every rank is joined: none outlives the command."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            log.warning("rank process %d did not stop within %.0f s: killed", process.pid, grace_s)
            process.kill()
            process.join()


def _stop_resource_tracker() -> None:
    """multiprocessing's resource tracker, started for the spawned ranks, would exit only once this process has
    (its pipe closed): stopped here, so that no process outlives the command. (A private call, hence getattr.)"""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        stop()


def spawn(cfg: Any, run_dir: Path) -> None:
    """Start parallel.world_size local ranks and wait; any rank's failure ends them all, and so does SIGTERM
    or SIGINT to this process (``stop_on_signals(..., interrupt=False)`` records it; the ranks are stopped here)."""
    world_size = cfg.parallel.world_size
    init_method = f"tcp://127.0.0.1:{cfg.parallel.master_port or free_port()}"
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    stop = terminated()
    if stop is not None:  # (stopped before a rank started)
        raise stop
    context = mp.start_processes(_spawned, args=(cfg_yaml, str(run_dir), world_size, init_method), nprocs=world_size,
                                 join=False, start_method="spawn")
    failure: mp.ProcessRaisedException | mp.ProcessExitedException | None = None
    try:
        while terminated() is None and not context.join(timeout=0.2):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        failure = err
    stop = terminated()
    if stop is not None:
        stop_ranks(context.processes, cfg.parallel.timeout_s)
        mark_stopped(run_dir, stop)  # (a rank that finished while the others stopped may have written "ok")
    _stop_resource_tracker()
    if stop is not None:
        raise stop
    if isinstance(failure, mp.ProcessRaisedException):
        failed = RunMetrics.read(run_dir)
        raise RankFailed(failed.failed_rank if failed and failed.failed_rank is not None else failure.error_index,
                         failed.error if failed and failed.error else str(failure)) from None
    if isinstance(failure, mp.ProcessExitedException):
        rundir.mark_failed(run_dir, f"rank {failure.error_index} exited with code {failure.exit_code}",
                           failure.error_index)
        raise RankFailed(failure.error_index, f"exited with code {failure.exit_code}") from None


class RankFailed(RuntimeError):
    def __init__(self, rank: int, error: str) -> None:
        self.rank, self.error = rank, error
        super().__init__(f"rank {rank} failed: {error}")
