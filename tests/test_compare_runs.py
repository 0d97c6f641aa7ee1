"""compare on real runs of the tiny model: the same model at W = 1 and W = 2, another checkpoint, where it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import TINY, cli, metrics

from deepseek_ptq.analysis import compare
from deepseek_ptq.model.checkpoint import write_shards
from deepseek_ptq.model.synthetic import random_full_state


def _compare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepseek_ptq.compare", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_out_in_a_missing_folder_fails_before_the_work(tmp_path, capsys):
    # Neither run exists: the --out error coming first shows that nothing was read before it.
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "missing" / "dir" / "x")]) == 2
    assert f"--out {tmp_path}/missing/dir/x: the folder {tmp_path}/missing/dir does not exist. Fix:" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """model=tiny at W = 1 (the packaged checkpoint read in place) and W = 2 (its shards in the cache), and
    model=tiny on another checkpoint."""
    base = tmp_path_factory.mktemp("tiny_runs")
    other = base / "other_ckpt"
    write_shards(random_full_state(TINY, 0), TINY, other, 1)
    (other / "config.json").write_text(json.dumps(TINY.to_dict()))
    runs = {"w1": [], "w2": ["parallel=mp2"], "other": [f"model.ckpt_dir={other}", "model.config=null"]}
    for name, overrides in runs.items():
        result = cli(base / name, *overrides)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Inserted" not in result.stdout + result.stderr  # modelopt's per-rank count (W = 2: one per rank)
    return {name: base / name for name in runs}


@pytest.mark.slow  # two spawned ranks
def test_same_model_at_w1_and_w2_compares_into_the_second_runs_folder(tiny_runs, tmp_path):
    a, b = tiny_runs["w1"], tiny_runs["w2"]
    assert metrics(a)["ckpt_dir"] != metrics(b)["ckpt_dir"]  # in place vs the cache: the same weights
    assert metrics(a)["checkpoint"] == metrics(b)["checkpoint"]
    done = _compare(tmp_path, a, b)
    assert done.returncode == 0, done.stderr
    md, js = b / "analysis" / "compare-w1.md", b / "analysis" / "compare-w1.json"
    assert f"written: {md}, {js}" in done.stderr and list(tmp_path.iterdir()) == []  # nothing in the current folder
    weights = json.loads(js.read_text())["groups"]["expert weight"]
    assert weights["identical"] == weights["compared"] == 3 * 16 * 3  # weight amax do not depend on W
    assert "A: w1 (nvfp4, topk+sync, W=1)" in md.read_text()


@pytest.mark.slow  # reads the module's runs (two spawned ranks among them)
def test_another_checkpoint_of_the_same_model_is_refused(tiny_runs, tmp_path):
    done = _compare(tmp_path, tiny_runs["w1"], tiny_runs["other"])
    assert done.returncode == 2 and "the runs calibrated different models" in done.stderr and "Fix:" in done.stderr
    assert not (tiny_runs["other"] / "analysis").exists()
