"""The one reader of a run directory (pipeline/rundir.py, pipeline/metrics.py) on real files."""

from __future__ import annotations

import json

import pytest
import torch

from deepseek_ptq.errors import UserError
from deepseek_ptq.pipeline.metrics import RunMetrics
from deepseek_ptq.pipeline.rundir import amax_path, read_amax, read_finished


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
