"""A real Hydra sweep in a subprocess, then the comparison and the sweep report on it."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import with_fast
from wandb_records import read_run

from deepseek_ptq.analysis import compare, report

pytestmark = pytest.mark.slow  # every test reads the module's sweep (two subprocess jobs and a failing one)


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """Two jobs (NVFP4, FP8) with evaluation and W&B on, plus one job that fails at run time."""
    folder = tmp_path_factory.mktemp("sweep") / "multirun"
    overrides = with_fast(["logger=wandb", "eval.enabled=true", "eval.num_samples=4"])
    done = _cli("-m", "deepseek_ptq", "-m", f"hydra.sweep.dir={folder}", "quant=nvfp4,fp8", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = _cli("-m", "deepseek_ptq", f"hydra.run.dir={folder}/2_failing", *with_fast(["data.num_samples=0"]))
    assert failed.returncode != 0
    return folder


def _jobs(sweep: Path) -> list[Path]:
    return [p for p in report.job_dirs(sweep) if (p / "metrics.json").exists()
            and json.loads((p / "metrics.json").read_text())["status"] == "ok"]


def test_compare_invariants_across_quant_formats(sweep: Path, tmp_path: Path) -> None:
    nvfp4, fp8 = _jobs(sweep)
    assert "quant=nvfp4" in nvfp4.name and "quant=fp8" in fp8.name
    out = tmp_path / "cmp"
    assert compare.main([str(nvfp4), str(fp8), "--out", str(out)]) == 0
    result = json.loads((tmp_path / "cmp.json").read_text())
    groups = result["groups"]
    # Max calibration collects statistics with quantization off: the format does not change any amax.
    for name in ("expert weight", "expert w1 input", "expert w3 input", "attention", "shared experts", "dense MLP"):
        if name in groups:
            assert groups[name]["identical"] == groups[name]["compared"] > 0, name
    assert groups["expert weight"]["compared"] == 3 * 16 * 3  # 3 MoE layers x 16 experts x w1/w2/w3
    assert groups["expert w2 input"]["ratio_b_over_a"]["equal"] == 1.0
    assert "| expert weight | 144 | 144 |" in (tmp_path / "cmp.md").read_text()

    # Evaluation, paired per held-out sequence: FP8 loses less than NVFP4 on (nearly) every sequence.
    ev = result["eval"]
    assert ev["paired"] and ev["sequences"] == 4 and ev["unit"] == "bpb"
    kl = ev["kl"]
    a_metrics, b_metrics = (json.loads((run / "metrics.json").read_text())["eval"] for run in (nvfp4, fp8))
    assert kl["a"] == pytest.approx(a_metrics["kl"], rel=1e-9) and kl["b"] == pytest.approx(b_metrics["kl"], rel=1e-9)
    assert kl["b_minus_a"] < 0 and kl["se"] > 0 and kl["z"] < -2 and kl["b_lower_share"] == 1.0
    assert "Evaluation, paired over 4 held-out sequences" in (tmp_path / "cmp.md").read_text()


def test_compare_says_why_evaluation_is_not_paired(sweep: Path, tmp_path: Path) -> None:
    nvfp4, fp8 = _jobs(sweep)
    other = tmp_path / "fp8_copy"
    shutil.copytree(fp8, other)
    (other / "stats" / "eval_sequences.csv").unlink()
    assert compare.main([str(nvfp4), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert json.loads((tmp_path / "cmp.json").read_text())["eval"] == {
        "paired": False, "reason": "no stats/eval_sequences.csv in B (run with eval.enabled=true)"}


def test_report_has_a_row_per_job_and_sane_evaluation(sweep: Path) -> None:
    done = _cli("-m", "deepseek_ptq.report", str(sweep), timeout=120)
    assert done.returncode == 0, done.stderr
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "num_samples=0" in rows[2]["overrides"] and "at least one sample" in rows[2]["error"]
    by_quant = {("fp8" if "quant=fp8" in r["overrides"] else "nvfp4"): r for r in rows[:2]}
    for r in by_quant.values():
        for key in ("kl", "kl_se", "top1_agreement", "quality_ref", "quality_quant", "quality_delta",
                    "quality_delta_se", "tokens_per_s"):
            assert math.isfinite(float(r[key])), key
        assert float(r["kl"]) > 0 and 0 < float(r["kl_se"]) < float(r["kl"]) and r["quality_unit"] == "bits/byte"
        assert f"{float(r['kl']):.4g} ± {float(r['kl_se']):.2g}" in (sweep / "report.md").read_text()
    assert float(by_quant["fp8"]["kl"]) < float(by_quant["nvfp4"]["kl"])  # 8-bit loses less than 4-bit
    markdown = (sweep / "report.md").read_text()
    assert markdown.startswith("All jobs: data.seq_len=64, data.batch_size=4\n")  # shared overrides said once
    assert markdown.count("\n") == 2 + 2 + 3 and "| quant=nvfp4,data.num_samples=8,logger=wandb," in markdown
    assert (sweep / "report.png").read_bytes().startswith(b"\x89PNG")


def test_sweep_jobs_share_a_wandb_group(sweep: Path) -> None:
    runs = [read_run(next((job / "wandb").glob("offline-run-*/run-*.wandb"))) for job in _jobs(sweep)]
    groups = {r.run.run_group for r in runs}
    assert len(groups) == 1 and groups.pop().endswith("multirun")
    assert {r.run.job_type for r in runs} == {"topk"}
    assert sorted(r.run.display_name.split(",")[0] for r in runs) == ["quant=fp8", "quant=nvfp4"]


def test_compare_refuses_runs_of_different_models(sweep: Path, tmp_path: Path) -> None:
    nvfp4, fp8 = _jobs(sweep)
    other = tmp_path / "other_model"
    shutil.copytree(fp8, other, ignore=shutil.ignore_patterns("wandb"))
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["checkpoint"] = "/somewhere/else"
    (other / "metrics.json").write_text(json.dumps(metrics))
    done = _cli("-m", "deepseek_ptq.compare", str(nvfp4), str(other), "--out", str(tmp_path / "x"), timeout=120)
    assert done.returncode == 2
    assert "different models" in done.stderr and "Fix:" in done.stderr
    assert not (tmp_path / "x.md").exists()


def test_compare_refuses_a_failed_run(sweep: Path, tmp_path: Path) -> None:
    nvfp4 = _jobs(sweep)[0]
    assert compare.main([str(nvfp4), str(sweep / "2_failing"), "--out", str(tmp_path / "y")]) == 2
