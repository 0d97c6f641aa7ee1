"""The run directory (pipeline/rundir.py, pipeline/metrics.py) on real files: who owns it, its reader, file modes."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from deepseek_ptq.errors import UserError
from deepseek_ptq.pipeline.metrics import RunMetrics
from deepseek_ptq.pipeline.rundir import OWNER, RunDirTaken, amax_path, claim, read_amax, read_finished


def _write(run, metrics):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_run_metrics_types_what_tools_read_and_keeps_unknown_keys(tmp_path):
    _write(tmp_path, {"status": "ok", "world_size": 2, "quant": "nvfp4", "calib": "topk", "calib_sync": True,
                      "timings_s": {"calibrate": 1.5}, "eval": None, "a_key_from_a_later_version": [1, 2]})
    m = RunMetrics.read(tmp_path)
    assert (m.status, m.world_size, m.timings_s["calibrate"], m.eval) == ("ok", 2, 1.5, None)
    assert m.mode_label == "nvfp4, topk+sync, W=2"
    assert m.extra == {"a_key_from_a_later_version": [1, 2]}
    assert RunMetrics.read(tmp_path / "nothing") is None
    (tmp_path / "metrics.json").write_text("{truncated")
    assert RunMetrics.read(tmp_path) is None


def test_read_finished_refuses_failed_and_missing_runs(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        read_finished(tmp_path)
    _write(tmp_path, {"status": "failed", "error": "rank 1 exited"})
    with pytest.raises(UserError, match="status 'failed': rank 1 exited"):
        read_finished(tmp_path)


def test_read_amax_merges_ranks_by_max_and_needs_every_rank(tmp_path):
    (tmp_path / "amax").mkdir()
    key, expert = "layers.0.attn.wo.input_quantizer._amax", "layers.1.ffn.experts.{}.w1.input_quantizer._amax"
    torch.save({key: torch.tensor(2.0), expert.format(0): torch.tensor(1.0)}, amax_path(tmp_path, 0, 2))
    with pytest.raises(UserError, match="does not exist"):
        read_amax(tmp_path, 2)
    torch.save({key: torch.tensor(3.0), expert.format(1): torch.tensor(4.0)}, amax_path(tmp_path, 1, 2))
    merged = read_amax(tmp_path, 2)
    assert merged == {key: torch.tensor(3.0), expert.format(0): torch.tensor(1.0), expert.format(1): torch.tensor(4.0)}


# ---------------------------------------------------------------------------------------------- owning the folder


def test_claim_takes_a_new_or_empty_folder_and_refuses_a_second_claim(tmp_path):
    first = claim(tmp_path / "new" / "run")
    try:
        assert json.loads((tmp_path / "new" / "run" / OWNER).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirTaken, match="is in use by another run"):
            claim(tmp_path / "new" / "run")
    finally:
        first.release()
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty").release()


def test_claim_refuses_a_finished_or_failed_run_and_a_folder_with_files(tmp_path):
    for status, words in (("ok", "holds a finished run"), ("failed", "holds a failed run"),
                          ("running", "holds a run that stopped without finishing")):
        run = tmp_path / status
        claim(run).release()
        _write(run, {"status": status})
        before = sorted(p.name for p in run.iterdir())
        with pytest.raises(RunDirTaken, match=words) as err:
            claim(run)
        assert f"pass another hydra.run.dir, or remove {run}" in str(err.value)
        assert sorted(p.name for p in run.iterdir()) == before and RunMetrics.read(run).status == status
    old = tmp_path / "old"  # a run directory from before owner files, or any folder of the user's
    (old / "stats").mkdir(parents=True)
    (old / "rank1.log").write_text("x")
    with pytest.raises(RunDirTaken, match=r"already holds files \(rank1.log, stats\)"):
        claim(old)
    assert sorted(p.name for p in old.iterdir()) == ["rank1.log", "stats"]  # the owner file it tried is gone


def test_claim_of_a_file_is_a_user_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file"):
        claim(tmp_path / "f")


_HOLD = """
import sys, time
from pathlib import Path
from deepseek_ptq.pipeline.rundir import claim, write_metrics
run = Path(sys.argv[1])
claim(run)
write_metrics(run, {"status": "running"})
print("claimed", flush=True)
time.sleep(120)
"""


def test_resume_takes_over_only_an_unfinished_run_whose_process_is_gone(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(RunDirTaken, match=rf"in use by another run \(pid {holder.pid} "):
            claim(run, resume=True)
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process, metrics.json still says "running"
        holder.wait()
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- quant=fp8\n- calib.resume=false\n")
    with pytest.raises(RunDirTaken, match=r"had other overrides \(quant=fp8, calib.resume=false\)"):
        claim(run, resume=True, overrides=["quant=nvfp4", "calib.resume=true"])
    # where it logs and the resume switches may differ (the resume state's fingerprint ignores them too)
    resumed = claim(run, resume=True, overrides=["quant=fp8", "calib.resume=true", "logger=none",
                                                 "logger.mode=offline", "calib.hidden_on_host=true"])
    try:
        assert json.loads((run / OWNER).read_text())["pid"] == os.getpid()
    finally:
        resumed.release()
    _write(run, {"status": "ok"})
    with pytest.raises(RunDirTaken, match="nothing to resume"):
        claim(run, resume=True)


def test_time_stamped_default_folder_moves_to_the_next_counter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from deepseek_ptq.pipeline.dir_callback import claim_folder

    cfg = make_cfg(["logger=none"], hydra=True)
    claims = [claim_folder(copy.deepcopy(cfg), "run") for _ in range(3)]  # one config: one time stamp
    try:
        names = [c.path.name for c in claims]
        stamp = names[0].split("_")[0]
        assert names == [f"{stamp}_logger=none", f"{stamp}.2_logger=none", f"{stamp}.3_logger=none"]
        explicit = make_cfg(["logger=none", f"hydra.run.dir={tmp_path / 'mine'}"], hydra=True)
        claims.append(claim_folder(explicit, "run"))
        with pytest.raises(RunDirTaken, match="mine is in use"):  # a folder the user named is never renamed
            claim_folder(explicit, "run")
        sweep = copy.deepcopy(cfg)
        claims += [claim_folder(copy.deepcopy(cfg), "sweep"), claim_folder(sweep, "sweep")]
        assert claims[-1].path.name == claims[-2].path.name + ".2"
        assert f"hydra.sweep.dir='{claims[-1].path}'" in sweep.hydra.overrides.hydra  # what the jobs are composed from
    finally:
        for c in claims:
            c.release()


# ---------------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writes_get_the_modes_of_the_umask(tmp_path, mask):
    from deepseek_ptq.files import atomic_output_dir, atomic_write, write_json

    previous = os.umask(mask)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        atomic_write(tmp_path / "w.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
        with atomic_output_dir(tmp_path / "out") as out:
            (out / "f").write_text("x")
    finally:
        os.umask(previous)
    for name in ("m.json", "w.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
