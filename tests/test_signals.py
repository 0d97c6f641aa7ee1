"""Runs stopped from outside (subprocesses, real signals, real gloo ranks): SIGTERM (a scheduler's time limit,
torchrun ending the others) and SIGINT (Ctrl-C) to the command or to its whole process group, and a rank
killed under torchrun. No process may outlive the command; metrics.json names what happened."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import with_fast
from test_cli import metrics

from deepseek_ptq.pipeline import rundir
from deepseek_ptq.pipeline.launch import (
    STOPPED_DIR,
    Peer,
    PeerLost,
    Team,
    Terminated,
    free_port,
    join_team,
    leave_team,
    record_rank_failure,
    restore_signals,
    stop_on_signals,
)

# Long enough that the signal lands inside calibration (W=2 calibrates 32 batches in about 3 s here).
LONGER = ["data.num_samples=128", "parallel.timeout_s=60"]


def _start(args: list[str], tmp: Path) -> subprocess.Popen:
    # A session of its own: the test can signal the whole group (what a terminal's Ctrl-C and a scheduler do),
    # then look for any process left in it. TMPDIR: what the ranks leave in the temp dir is this test's.
    (tmp / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp / "tmp")}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=tmp)


def _rank_logs(run_dir: Path, world_size: int) -> list[Path]:
    return [run_dir / "run.log"] + [run_dir / f"rank{r}.log" for r in range(1, world_size)]


def _wait_for_calibration(proc: subprocess.Popen, run_dir: Path, world_size: int) -> list[int]:
    """Every rank's pid, once every rank's log says calibration started."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        texts = [log.read_text() if log.exists() else "" for log in _rank_logs(run_dir, world_size)]
        if all("calibration path" in text for text in texts):
            return [int(re.search(rf"rank {r} of {world_size}: pid (\d+)", text).group(1)) for r, text in enumerate(texts)]
        time.sleep(0.05)
    raise AssertionError(f"calibration did not start (exit {proc.poll()}): {proc.stdout.read()[-2000:] if proc.poll() is not None else ''}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _in_session(sid: int) -> list[str]:
    """Every process of the session the command started (its ranks, multiprocessing's helpers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid:
                found.append(f"{entry} ({stat.split('(', 1)[1].split(')')[0]}, state {fields[0]})")
    return found


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("to_group", [False, True], ids=["parent", "group"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_every_rank_and_records_failed(tmp_path, cache_dir, world_size, to_group, signum):
    run_dir = tmp_path / "run"
    overrides = with_fast(LONGER + (["parallel=mp2"] if world_size == 2 else []))
    proc = _start([sys.executable, "-m", "deepseek_ptq", f"hydra.run.dir={run_dir}", *overrides], tmp_path)
    pids = _wait_for_calibration(proc, run_dir, world_size)
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    sent = time.time()
    out, _ = proc.communicate(timeout=90)
    assert time.time() - sent < 30, "the ranks were not stopped within the collective timeout"
    assert proc.returncode == 128 + signum, out[-3000:]
    assert not [pid for pid in pids if _alive(pid)] and not _in_session(proc.pid), _in_session(proc.pid)
    m = metrics(run_dir)
    assert m["status"] == "failed" and f"stopped by {signum.name}" in m["error"], m
    assert "failed_rank" not in m  # no rank is to blame
    assert not (run_dir / "amax").exists()
    # One console line says it, and no traceback.
    assert "Traceback" not in out and out.count("stopped by") == 1, out[-3000:]


@pytest.mark.slow  # torchrun with two ranks
@pytest.mark.parametrize("survivor_paused", [False, True], ids=["collective_first", "sigterm_first"])
def test_killed_torchrun_rank_is_named(tmp_path, cache_dir, survivor_paused):
    """The survivor's collective fails with gloo's "Connection reset by peer", or torchrun's SIGTERM reaches it
    first (paused here while rank 1 dies and torchrun stops the survivors; in a CI run it was computing): either
    way the record names the rank that died (its process is gone), not the survivor."""
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = _start([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "deepseek_ptq",
                   f"hydra.run.dir={run_dir}", *with_fast(LONGER + ["parallel=mp2"])], tmp_path)
    rank0, rank1 = _wait_for_calibration(proc, run_dir, 2)
    if survivor_paused:
        os.kill(rank0, signal.SIGSTOP)
    os.kill(rank1, signal.SIGKILL)
    if survivor_paused:
        deadline = time.time() + 30
        while _alive(rank1) and time.time() < deadline:  # (torchrun reaps it, then sends rank 0 its SIGTERM)
            time.sleep(0.01)
        time.sleep(1.0)
        os.kill(rank0, signal.SIGCONT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    m = metrics(run_dir)
    assert m["status"] == "failed" and m["failed_rank"] == 1, m
    assert m["error"].startswith(f"rank 1 died (process {rank1} on "), m["error"]
    assert "Traceback" not in out.split("torch/distributed/elastic")[0], out[-3000:]  # (torchrun's own report follows)
    assert not _in_session(proc.pid)


@pytest.mark.parametrize("peer", ["killed", "told_to_stop", "finished"])
def test_sigterm_after_a_peer_died_names_that_peer(tmp_path, peer):
    """torchrun's SIGTERM to a survivor may come before the survivor's collective notices the killed rank (a
    CI run: the survivor was computing). Its handler names the rank whose process is gone, unless a signal told
    that rank to stop too (a group's SIGTERM may end it first), or the job's last collective is behind them
    (the other ranks finish while rank 0 writes the results): then the signal is the run's failure."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # (reaped: its pid is free)
    rundir.write_metrics(tmp_path, {"status": "running"})
    if peer == "told_to_stop":
        (tmp_path / STOPPED_DIR).mkdir()
        (tmp_path / STOPPED_DIR / "rank1").touch()
    host = socket.gethostname()
    previous = stop_on_signals(tmp_path)
    join_team(Team(tmp_path, 0, [Peer(host, os.getpid()), Peer(host, gone.pid)]))
    if peer == "finished":
        leave_team()
    try:
        with pytest.raises(Terminated) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # (the handler raises here)
    finally:
        leave_team()
        restore_signals(stop_on_signals(None))  # (this process's stop forgotten: later tests run in it)
        restore_signals(previous)
    m = metrics(tmp_path)
    # this rank's note (its own exit is no death to blame), while it is in the job
    assert (tmp_path / STOPPED_DIR / "rank0").exists() == (peer != "finished")
    if peer != "killed":
        assert stop.value.peer_lost is None and m["error"] == str(stop.value) and "failed_rank" not in m, m
    else:
        assert m["failed_rank"] == 1 and m["error"].startswith(f"rank 1 died (process {gone.pid} on {host} "), m
        assert m["error"].endswith("rank 0 lost it: stopped by SIGTERM (signal 15: another rank failed, or the "
                                   "launcher or a scheduler stopped the run)"), m["error"]


def test_lost_peer_on_another_host_is_not_blamed_on_the_survivor(tmp_path):
    """What a survivor records for gloo's "Connection reset by peer": a peer on another host was lost (which one
    its address says), with no failed_rank; with every peer on this host alive, its own error as before."""
    gloo = "[gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:6535: Connection reset by peer. GLHF!"
    remote = [Peer(socket.gethostname(), os.getpid()), Peer("another-host", 4242)]
    (tmp_path / "a").mkdir()
    rundir.write_metrics(tmp_path / "a", {"status": "running"})
    failure = record_rank_failure(RuntimeError(gloo), tmp_path / "a", 0, remote)
    assert isinstance(failure, PeerLost)
    m = metrics(tmp_path / "a")
    assert m["error"] == f"rank 0 lost a peer on another host (that rank's log says why): {gloo}" and "failed_rank" not in m

    local = [Peer(socket.gethostname(), os.getpid()), Peer(socket.gethostname(), os.getpid())]  # rank 1: alive
    (tmp_path / "b").mkdir()
    rundir.write_metrics(tmp_path / "b", {"status": "running"})
    err = RuntimeError(gloo)
    assert record_rank_failure(err, tmp_path / "b", 0, local) is err
    assert metrics(tmp_path / "b")["failed_rank"] == 0
