"""Statistics, plots and the W&B run: what a user looks at to see what calibration did."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import run_job
from test_cli import cli
from wandb_records import read_run

from deepseek_ptq.observe.stats import QuantizerPath, ratio_summary
from deepseek_ptq.observe.wandb_log import flatten

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _offline_run(run_dir: Path):
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return read_run(files[0]), files[0].parent


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, cache_dir) -> Path:
    """One default-like run with W&B on and evaluation on (tiny model, short calibration)."""
    return run_job(tmp_path_factory.mktemp("obs"), ["logger=wandb", "eval.enabled=true", "eval.num_samples=4"])


def test_summary_histograms_and_expert_table_in_the_wandb_file(wandb_run: Path) -> None:
    metrics = json.loads((wandb_run / "metrics.json").read_text())
    offline, run_folder = _offline_run(wandb_run)
    assert offline.exit_code == 0
    assert offline.run.job_type == "topk"

    # Every scalar of metrics.json is in the W&B summary with the same value (eval included).
    expected = flatten({k: v for k, v in metrics.items() if k != "wandb"})
    assert expected["eval/kl"] > 0
    for key, value in expected.items():
        assert key in offline.summary, key
        got = offline.summary[key]
        assert got == value or (isinstance(value, float) and math.isclose(got, value, rel_tol=1e-12)), key

    # Histograms of amax per linear kind: counts add up to the quantizers of that kind in stats/amax.csv.
    history = {k: v for h in offline.history for k, v in h.items()}
    with open(wandb_run / "stats" / "amax.csv") as f:
        rows = list(csv.DictReader(f))
    for role in ("input", "weight"):
        kinds = {r["kind"] for r in rows if r["role"] == role and r["amax_after"]}
        assert kinds, role
        for kind in kinds:
            key = f"amax/{role}/{kind}"
            assert history[f"{key}/_type"] == "histogram"
            n = sum(1 for r in rows if r["role"] == role and r["kind"] == kind and r["amax_after"])
            assert sum(history[f"{key}/values"]) == n, key
            top = max(float(r["amax_after"]) for r in rows if r["role"] == role and r["kind"] == kind and r["amax_after"])
            assert history[f"{key}/bins"][0] <= top <= history[f"{key}/bins"][-1]

    # The expert table: one row per routed expert, tokens as in stats/expert_tokens.csv.
    assert history["experts/_type"] == "table-file"
    table = json.loads((run_folder / "files" / history["experts/path"]).read_text())
    with open(wandb_run / "stats" / "expert_tokens.csv") as f:
        tokens = {(int(r["layer"]), int(r["expert"])): int(r["tokens"]) for r in csv.DictReader(f)}
    cols = table["columns"]
    assert cols[:3] == ["layer", "expert", "tokens"] and "w2_input_after" in cols and "w1_weight" in cols
    assert {(row[0], row[1]): row[2] for row in table["data"]} == tokens

    # The plots as images, and one artifact holding the quant summary and the amax dicts.
    for png in (wandb_run / "plots").glob("*.png"):
        assert history[f"plots/{png.stem}/_type"] == "image-file"
    assert any(a.type == "calibration" for a in offline.artifacts)
    calib = next(a for a in offline.artifacts if a.type == "calibration")
    paths = {e.path for e in calib.manifest.contents}
    assert ".quant_summary.txt" in paths and "amax/amax_dict_rank0-mp1.pt" in paths

    # W&B kept every folder of its own inside the run directory.
    assert metrics["wandb"]["sync_command"] == f"wandb sync {run_folder}"
    for sub in (".data", ".cache", ".config"):
        assert (wandb_run / "wandb" / sub).is_dir()


def test_plots_are_png_files_of_plausible_size(wandb_run: Path) -> None:
    names = sorted(p.name for p in (wandb_run / "plots").glob("*.png"))
    assert names == ["expert_tokens.png", "input_amax_by_layer.png", "w2_input_sync_ratio.png",
                     "weight_amax_by_layer.png"]
    for name in names:
        data = (wandb_run / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 8_000 < len(data) < 2_000_000, (name, len(data))


def test_token_counts_add_up_to_tokens_times_top_k(wandb_run: Path) -> None:
    metrics = json.loads((wandb_run / "metrics.json").read_text())
    per_layer = metrics["stats"]["expert_tokens"]
    assert sorted(per_layer) == ["1", "2", "3"]  # the tiny model's MoE layers
    for layer in per_layer.values():
        assert layer["total"] == metrics["tokens_calibrated"] * 4  # top-4 routing: each token fills 4 slots
    without = metrics["stats"]["experts_without_tokens"]
    assert metrics["counts"]["uncalibrated_experts"] == len(without)


def test_sync_ratio_statistics_match_the_csv(wandb_run: Path) -> None:
    metrics = json.loads((wandb_run / "metrics.json").read_text())
    with open(wandb_run / "stats" / "expert_input_sync.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["linear"] == "w2" and r["ratio"]]
    ratios = [float(r["ratio"]) for r in rows]
    for r in rows:
        assert float(r["amax_synced"]) >= float(r["amax_own"])  # peer max never lowers an amax
    summary = metrics["stats"]["expert_input_sync_ratio"]["w2"]
    assert summary == ratio_summary(ratios)
    assert summary["n"] == 48 and summary["smaller"] == 0 and summary["larger"] > 0.5


def test_ratio_summary_by_hand() -> None:
    s = ratio_summary([0.5, 1.0, 1.0, 2.0, 4.0])
    assert (s["larger"], s["equal"], s["smaller"]) == (0.4, 0.4, 0.2)
    assert s["median"] == 1.0 and s["max"] == 4.0 and s["p90"] == pytest.approx(3.2)
    assert ratio_summary([]) == {"n": 0}


@pytest.mark.parametrize("name, parsed", [
    ("layers.3.ffn.experts.17.w2.input_quantizer", (3, "expert.w2", 17, "input")),
    ("layers.1.ffn.shared_experts.w1.weight_quantizer", (1, "shared.w1", None, "weight")),
    ("layers.0.ffn.w3.input_quantizer", (0, "dense.w3", None, "input")),
    ("layers.2.attn.wkv_b.output_quantizer", (2, "attn.wkv_b", None, "output")),
    ("head.weight_quantizer", (None, "head", None, "weight")),
])
def test_quantizer_paths(name: str, parsed: tuple) -> None:
    p = QuantizerPath.parse(name)
    assert (p.layer, p.kind, p.expert, p.role) == parsed


def test_wandb_failure_does_not_fail_the_run(tmp_path: Path, cache_dir) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where W&B wants its folder")
    run_job(tmp_path, ["logger=wandb"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["wandb"] is None
    assert "W&B did not start" in (run_dir / "run.log").read_text()
    assert (run_dir / "plots" / "expert_tokens.png").exists()


def test_logger_none_writes_no_wandb_folder(tmp_path: Path, cache_dir) -> None:
    run_dir = run_job(tmp_path, ["logger=none"])
    assert not (run_dir / "wandb").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["wandb"] is None and metrics["eval"] is None
    assert "deepseek-ptq run ok" in (run_dir / "summary.md").read_text()


def test_wandb_online_without_a_server_falls_back_to_offline_in_bounded_time(tmp_path: Path, cache_dir) -> None:
    # Nothing listens on port 9 (discard); the key is well-formed but no account's. W&B's own bound is 90 s.
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40, "WANDB_MODE": None}
    run_dir = tmp_path / "run"
    result = cli(run_dir, "logger=wandb", "logger.mode=online", "logger.init_timeout_s=4", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("[WARNING]")]
    assert len(warnings) == 1 and "logging offline instead" in warnings[0], result.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "ok" and m["wandb"]["mode"] == "offline" and "127.0.0.1:9" in m["wandb"]["online_error"]
    # The wait is in the timings: the bound, plus the offline start and the logging (seconds).
    assert 4 <= m["timings_s"]["wandb"] < 4 + 15 and m["timings_s"]["total"] > m["timings_s"]["wandb"]
    offline, _ = _offline_run(run_dir)  # the one W&B run is the offline one; the failed start left no run-* folder
    assert offline.exit_code == 0 and not list((run_dir / "wandb").glob("run-*"))
    assert m["wandb"]["sync_command"] in (run_dir / "summary.md").read_text()


def test_wandb_mode_disabled_is_honoured(tmp_path: Path, cache_dir, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = run_job(tmp_path, ["logger=wandb"])
    assert not (run_dir / "wandb").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["wandb"] is None
