"""A run owns its folder (subprocesses of the command line): racing runs, default names, re-runs, read-only
folders, file modes."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import with_fast
from test_cli import cli, metrics

FAST_DIRNAME = ",".join(sorted(with_fast([])))  # Hydra's override_dirname of a run with the FAST overrides


def _start(cwd: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepseek_ptq", *with_fast(list(overrides))], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _finish(proc: subprocess.Popen) -> tuple[int, str, str, float]:
    start = time.time()
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err, time.time() - start


def _assert_own_run(run_dir: Path, pid: int, overrides: list[str]) -> None:
    """One run's folder: owned by process ``pid``, its own status, config and log, nothing of another run."""
    assert json.loads((run_dir / ".owner").read_text())["pid"] == pid
    m = metrics(run_dir)
    assert m["status"] == "ok" and "error" not in m, m
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "".join(f"- {o}\n" for o in overrides)
    log = (run_dir / "run.log").read_text()
    assert log.count("calibration path") == 1, log  # one run's lines (FileHandler appends: two runs, two)


def test_two_runs_started_together_into_one_folder(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    procs = {quant: _start(tmp_path, f"hydra.run.dir={run_dir}", f"quant={quant}") for quant in ("nvfp4", "fp8")}
    results = {quant: _finish(proc) for quant, proc in procs.items()}
    winners = [q for q, r in results.items() if r[0] == 0]
    assert len(winners) == 1, {q: r[2][-1500:] for q, r in results.items()}
    loser = results[next(q for q in results if q not in winners)]
    assert loser[0] == 1 and f"the run directory {run_dir} is in use by another run" in loser[2], loser[2][-1500:]
    assert "Fix: pass another hydra.run.dir" in loser[2] and "Traceback" not in loser[2]
    assert loser[3] < results[winners[0]][3]  # the loser stops at once, long before the winner is done
    _assert_own_run(run_dir, procs[winners[0]].pid, with_fast([f"quant={winners[0]}"]))
    assert metrics(run_dir)["quant"] == winners[0]
    assert "Inserted" not in results[winners[0]][1]  # modelopt's per-rank quantizer count stays off the console


def _take_default_names(tmp_path: Path, pattern: str, seconds: int = 60) -> set[Path]:
    """Folders of an earlier finished run under each default name of the next ``seconds`` (as if it ran then)."""
    taken = set()
    now = datetime.datetime.now()
    for s in range(seconds):
        t = now + datetime.timedelta(seconds=s)
        folder = tmp_path / t.strftime(pattern)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text('{"status": "ok"}')
        taken.add(folder)
    return taken


def test_plain_runs_in_one_second_get_folders_of_their_own(tmp_path, cache_dir):
    # Every default name of the coming minute is taken: each run must move on to <time>.N (not fail, not share).
    taken = _take_default_names(tmp_path, f"outputs/%Y-%m-%d/%H-%M-%S_{FAST_DIRNAME}")
    procs = [_start(tmp_path), _start(tmp_path)]  # the same overrides: the same default name
    results = [_finish(p) for p in procs]
    assert all(r[0] == 0 for r in results), [r[2][-1500:] for r in results]
    folders = set(tmp_path.glob("outputs/*/*")) - taken
    assert len(folders) == 2, folders
    owners = {json.loads((f / ".owner").read_text())["pid"]: f for f in folders}
    assert sorted(owners) == sorted(p.pid for p in procs)
    for pid, folder in owners.items():
        time_of_day, counter = folder.name.split("_")[0].split(".")
        assert int(counter) >= 2 and folder.with_name(f"{time_of_day}_{FAST_DIRNAME}") in taken
        _assert_own_run(folder, pid, with_fast([]))
    assert all(json.loads((f / "metrics.json").read_text()) == {"status": "ok"} for f in taken)  # untouched


def test_sweep_moves_on_from_a_taken_time_stamp(tmp_path, cache_dir):
    taken = _take_default_names(tmp_path, "outputs/multirun/%Y-%m-%d/%H-%M-%S")
    proc = subprocess.run([sys.executable, "-m", "deepseek_ptq", "-m", *with_fast(["quant=fp8"])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep,) = set(tmp_path.glob("outputs/multirun/*/*")) - taken
    assert sweep.name.endswith(".2") and (sweep / ".owner").exists()
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert job.name.startswith("0_") and metrics(job)["status"] == "ok"


def test_rerun_into_a_finished_run_is_refused_untouched(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert cli(run_dir).returncode == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    start = time.time()
    again = cli(run_dir, "quant=fp8")
    assert again.returncode == 1 and time.time() - start < 30
    assert f"the run directory {run_dir} holds a finished run. Fix: pass another hydra.run.dir, or remove {run_dir}" \
        in again.stderr and "Traceback" not in again.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()} == before


@contextmanager
def _read_only(folder: Path):
    """No one may write into ``folder``, root included (root ignores modes: the immutable attribute stops it)."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable and (shutil.which("chattr") is None
                      or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0):
        folder.chmod(0o755)
        pytest.skip("running as root on a file system without chattr +i: no folder is read-only")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("inside", [False, True])
def test_read_only_run_dir_is_one_clear_error(tmp_path, cache_dir, inside):
    folder = tmp_path / "ro"
    folder.mkdir()
    run_dir = folder / "run" if inside else folder  # a new folder in a read-only one, or the read-only one
    with _read_only(folder):
        result = cli(run_dir, timeout=60)
    assert result.returncode == 1
    assert f"[ERROR] cannot write the run directory {run_dir}" in result.stderr, result.stderr[-2000:]
    assert "Fix: pass a writable folder as hydra.run.dir" in result.stderr and "Traceback" not in result.stderr
    assert list(folder.iterdir()) == []


def test_files_follow_the_umask(tmp_path):
    # model=tiny_random at W = 1 writes its generated shards into a fresh cache: every kind of file a run makes.
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    previous = os.umask(0o022)
    try:
        result = subprocess.run([sys.executable, "-m", "deepseek_ptq", f"hydra.run.dir={run_dir}",
                                 *with_fast(["model=tiny_random"])], capture_output=True, text=True, timeout=240,
                                env={**os.environ, "DEEPSEEK_PTQ_CACHE": str(cache)})
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr[-2000:]
    mode = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    shards = [p for p in mode if p.startswith("cache/") and p.endswith(".safetensors")]
    assert shards and all(mode[p] == 0o644 for p in shards)
    assert mode["run/metrics.json"] == 0o644 and mode["run"] == mode["run/amax"] == mode["run/stats"] == 0o755
    assert {p: oct(m) for p, m in mode.items() if m != (0o755 if (tmp_path / p).is_dir() else 0o644)} == {}
