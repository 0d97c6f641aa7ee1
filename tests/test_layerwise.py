"""Layer-streamed calibration (calib.layerwise): the resident run's numbers, one layer in memory at a time."""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_amax, run_job, with_fast
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_cli import assert_failed, cli, metrics

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import shard_name
from deepseek_ptq.model.load import PACKAGE_DIR
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.pieces import LayerPiece
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.pipeline.rundir import amax_state
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.recipes import build_quant_config
from deepseek_ptq.quant.reuse import why_not_reuse

EVAL = ["eval.enabled=true", "eval.num_samples=4"]


def assert_same_run(resident: Path, streamed: Path) -> None:
    """Every amax bit for bit, the same summary, evaluation and expert statistics."""
    a, b = load_amax(resident), load_amax(streamed)
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert (resident / ".quant_summary.txt").read_text() == (streamed / ".quant_summary.txt").read_text()
    assert json.loads((resident / "hf_quant_config.json").read_text()) == json.loads((streamed / "hf_quant_config.json").read_text())
    ma, mb = metrics(resident), metrics(streamed)
    assert ma["eval"] == mb["eval"]
    assert ma["stats"] == mb["stats"] and ma["counts"]["quantizers"] == mb["counts"]["quantizers"]
    for name in ("amax.csv", "experts.csv"):
        if (resident / "stats" / name).exists():
            assert (resident / "stats" / name).read_text() == (streamed / "stats" / name).read_text(), name


@pytest.mark.parametrize("overrides", [
    ["quant=nvfp4", "calib=topk"],
    ["quant=nvfp4", "calib=topk", "calib.sync=false"],
    ["quant=nvfp4", "calib=all_experts"],
    ["quant=fp8", "calib=topk"],
    ["quant=fp8", "calib=all_experts", "calib.fast=false"],
], ids=["nvfp4-topk", "nvfp4-topk-nosync", "nvfp4-all_experts", "fp8-topk", "fp8-all_experts-plain"])
def test_streamed_run_equals_resident_run(tmp_path, cache_dir, overrides):
    resident = run_job(tmp_path / "resident", [*EVAL, *overrides])
    streamed = run_job(tmp_path / "streamed", [*EVAL, *overrides, "calib.layerwise=true"])
    assert_same_run(resident, streamed)
    m = metrics(streamed)
    assert m["layerwise"]["layers"] == 4 and m["layerwise"]["resumed_from_layer"] is None
    with open(streamed / "stats" / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2, 3] and all(float(r["calibrate_s"]) > 0 for r in rows)
    # the dense layer and the first MoE layer converted; the later MoE layers took over its modules
    assert [int(r["converted"]) for r in rows] == [1, 1, 0, 0] and m["layerwise"]["converted_layers"] == 2
    assert m["memory"]["peak_rss_gb"][0] > 0 and "peak_gpu_gb" in m["memory"]
    assert not (streamed / "resume").exists()  # a finished run keeps no resume state


def _calibrated_block(layer_id: int, mtq_cfg: dict) -> LayerPiece:
    args = ModelArgs.from_json(PACKAGE_DIR / "tiny" / "config.json")
    block = LayerPiece(args, layer_id, Parallel())
    init_random_(block, 0)
    hidden = [torch.randn(2, 8, args.dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))]
    calibrate(block.eval(), mtq_cfg, hidden, False, torch.device("cpu"), progress=False, piece=True)
    return block


def test_a_block_is_reused_only_where_the_rules_cannot_tell_the_layers_apart():
    default = build_quant_config(OmegaConf.create({"preset": "NVFP4_DEFAULT_CFG", "attn": None, "wo": None,
                                                   "algorithm": None}), on_cpu=True)
    block = _calibrated_block(1, default)
    assert why_not_reuse(block, default, 2) is None  # its "*conv1d*" rules match no layer number
    assert "dense or MoE" in why_not_reuse(_calibrated_block(0, default), default, 1)
    naming = {**default, "quant_cfg": [*default["quant_cfg"], {"quantizer_name": "*layers.2.ffn.experts.*",
                                                               "enable": False}]}
    assert "'*layers.2.ffn.experts.*' tells layers.1.ffn.experts.0" in why_not_reuse(block, naming, 2)
    assert why_not_reuse(block, naming, 3) is None  # layer 3 is as layer 1 for that rule
    # what a reused block calibrates starts from nothing: its amax are a fresh block's
    fresh = amax_state(_calibrated_block(2, default))
    block.renumber(2)
    init_random_(block, 0)
    hidden = [torch.randn(2, 8, block.args.dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))]
    calibrate(block, default, hidden, False, torch.device("cpu"), progress=False, piece=True, converted=True)
    reused = amax_state(block)
    assert fresh.keys() == reused.keys() and all(torch.equal(fresh[k], reused[k]) for k in fresh)


def test_every_run_reports_peak_memory(tmp_path, cache_dir):
    m = metrics(run_job(tmp_path, []))
    assert m["memory"]["max_peak_rss_gb"] > 0.1
    assert "layerwise" not in m


def test_peak_rss_is_the_runs_own_not_its_starters():
    """A process started by a large one (a test worker, a notebook) reports its own peak: Linux carries ru_maxrss
    across exec, which made two runs of 0.8 and 1.4 GB both read the pytest worker's 1.36 GB."""
    ballast = bytearray(600 << 20)  # 600 MB resident in this process
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from deepseek_ptq.observe.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(child.stdout.split()[-1]) < len(ballast) / 2, child.stdout
    del ballast


@pytest.mark.slow  # two spawned ranks, twice
def test_streamed_run_equals_resident_run_at_w2(tmp_path, cache_dir):
    resident, streamed = tmp_path / "resident", tmp_path / "streamed"
    for run_dir, extra in ((resident, []), (streamed, ["calib.layerwise=true"])):
        result = cli(run_dir, "parallel=mp2", *EVAL, "calib=all_experts", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(resident, streamed)
    assert metrics(streamed)["counts"]["fixup_collectives"] == 4  # one per layer (the resident run: one)


def test_missing_tensor_fails_before_any_compute(tmp_path, cache_dir):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = load_file(str(PACKAGE_DIR / "tiny" / shard_name(0, 1)))
    del state["layers.2.ffn.experts.5.w3.weight"]
    save_file(state, str(ckpt / shard_name(0, 1)))
    (ckpt / "config.json").write_text((PACKAGE_DIR / "tiny" / "config.json").read_text())
    start = time.perf_counter()
    result = cli(tmp_path / "run", f"model.ckpt_dir={ckpt}", "calib.layerwise=true")
    assert_failed(result, tmp_path / "run", "layers.2.ffn.experts.5.w3.weight")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "resume").exists()
    print(f"failed in {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("key", ["layers.3.ffn.experts.6.w2.scale", "layers.3.ffn.shared_experts.w1.scale"])
def test_non_finite_weight_of_a_reused_block_is_named(tmp_path, cache_dir, key):
    # layer 3 reuses layer 2's block: its experts' finite check reads the stacked weights' max
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = load_file(str(PACKAGE_DIR / "tiny" / shard_name(0, 1)))
    state[key][0, 0] = float("nan")
    save_file(state, str(ckpt / shard_name(0, 1)))
    (ckpt / "config.json").write_text((PACKAGE_DIR / "tiny" / "config.json").read_text())
    result = cli(tmp_path / "run", f"model.ckpt_dir={ckpt}", "calib.layerwise=true")
    assert_failed(result, tmp_path / "run", "non-finite values", key.replace(".scale", ".weight"))


def test_search_algorithms_are_refused_layer_by_layer(tmp_path, cache_dir):
    result = cli(tmp_path / "run", "quant=nvfp4_awq_lite", "calib.layerwise=true")
    assert_failed(result, tmp_path / "run", "awq_lite", "layer by layer")


def _wait_for(path_glob: Path, pattern: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list(path_glob.glob(pattern)):
        assert time.time() < deadline, f"no {pattern} in {path_glob}"
        time.sleep(0.01)


def _killed_after_layer_2(run_dir: Path, overrides: list[str]) -> None:
    """A streamed run in a subprocess, SIGKILLed as soon as its state after layer 2 is on disk."""
    proc = subprocess.Popen([sys.executable, "-m", "deepseek_ptq", f"hydra.run.dir={run_dir}", *with_fast(overrides)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(run_dir / "resume", "rank0-mp1-layer0002.pt")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("where", [
    [],
    # the resumed hidden states go from the file straight to pinned host memory
    pytest.param(["parallel.device=cuda", "calib.hidden_on_host=true"], marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]),
], ids=["cpu", "gpu-hidden_on_host"])
def test_run_killed_mid_stream_resumes_to_the_same_amax(tmp_path, cache_dir, where):
    overrides = [*EVAL, "calib=all_experts", "calib.layerwise=true", "logger=none", *where]
    whole = run_job(tmp_path / "whole", overrides)
    run_dir = tmp_path / "killed"
    _killed_after_layer_2(run_dir, overrides)
    assert metrics(run_dir)["status"] == "running"  # killed: nothing finished-looking
    assert not (run_dir / "amax").exists()
    # A state that another config wrote is refused, and kept.
    states = sorted((run_dir / "resume").glob("rank0-mp1-layer*.pt"))
    latest = torch.load(states[-1], weights_only=False)
    torch.save({**latest, "fingerprint": "of-another-config"}, states[-1])
    result = cli(run_dir, *overrides, "calib.resume=true")
    assert_failed(result, run_dir, "another config")
    assert states[-1].exists()
    torch.save(latest, states[-1])
    result = cli(run_dir, *overrides, "calib.resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(run_dir)
    assert m["status"] == "ok" and m["layerwise"]["resumed_from_layer"] >= 2
    assert_same_run(whole, run_dir)
    assert not (run_dir / "resume").exists()


@pytest.mark.slow  # four streamed runs
def test_a_full_disk_fails_clearly_and_keeps_the_last_state(tmp_path, cache_dir):
    """A write of the resume state that the file system refuses (here a file-size limit: EFBIG, as ENOSPC would
    be for a full disk) fails the run with one clear error; the state of the layer before stays, and a resume from
    it finishes with the uninterrupted run's numbers."""
    overrides = [*EVAL, "calib=all_experts", "calib.layerwise=true", "logger=none"]
    whole = run_job(tmp_path / "whole", overrides)
    # The sizes of the states after layers 1 and 2, from a run killed after writing them.
    sizes_dir = tmp_path / "sizes"
    _killed_after_layer_2(sizes_dir, overrides)
    first, second = (os.path.getsize(sizes_dir / "resume" / f"rank0-mp1-layer000{k}.pt") for k in (1, 2))
    assert first < second
    limit = (first + second) // 2
    run_dir = tmp_path / "full"
    result = subprocess.run(
        [sys.executable, "-m", "deepseek_ptq", f"hydra.run.dir={run_dir}", *with_fast(overrides)],
        capture_output=True, text=True, timeout=240,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_failed(result, run_dir, "cannot write the resume state", "free disk space")
    assert result.stderr.count("[ERROR]") == 1, result.stderr[-2000:]
    kept = sorted(p.name for p in (run_dir / "resume").iterdir())
    assert kept == ["rank0-mp1-layer0001.pt"], kept  # no partial file beside it
    result = cli(run_dir, *overrides, "calib.resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(run_dir)["layerwise"]["resumed_from_layer"] == 1
    assert_same_run(whole, run_dir)


@pytest.mark.slow  # two subprocess runs of a 24-layer model
def test_streamed_run_peaks_lower_in_host_memory(tmp_path, cache_dir):
    # 12 layers drawn at random: the resident run holds them all, the streamed run one at a time (24 layers, 90 s
    # alone, ran past the 240 s subprocess limit once in CI while the other worker ran multi-rank tests).
    model = ["model=tiny_random", "model.random_weights=true", "model.n_layers=12", "model.dim=512",
             "model.moe_inter_dim=256", "model.n_routed_experts=32", "logger=none"]
    peaks = {}
    for name, extra in (("resident", []), ("streamed", ["calib.layerwise=true"])):
        result = cli(tmp_path / name, *model, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[name] = metrics(tmp_path / name)["memory"]["max_peak_rss_gb"]
    print("peak RSS (GB)", peaks)
    assert peaks["streamed"] < peaks["resident"] - 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_streamed_run_on_the_gpu_with_hidden_states_on_the_host(tmp_path, cache_dir):
    # Pinned host buffers, copied in and back batch by batch, and the read-ahead thread's pinned tensors.
    common = [*EVAL, "parallel.device=cuda", "calib=all_experts"]
    resident = run_job(tmp_path / "resident", common)
    streamed = run_job(tmp_path / "streamed", [*common, "calib.layerwise=true", "calib.hidden_on_host=true"])
    assert_same_run(resident, streamed)
    assert metrics(streamed)["memory"]["max_peak_gpu_gb"] < metrics(resident)["memory"]["max_peak_gpu_gb"]


def test_streamed_run_logs_its_layer_timings_to_wandb(tmp_path, cache_dir):
    from test_observability import _offline_run

    run_dir = run_job(tmp_path, ["logger=wandb", "calib.layerwise=true"])
    offline, folder = _offline_run(run_dir)
    history = {k: v for h in offline.history for k, v in h.items()}
    assert history["layers/_type"] == "table-file"
    table = json.loads((folder / "files" / history["layers/path"]).read_text())
    with open(run_dir / "stats" / "layers.csv") as f:
        rows = list(csv.reader(f))
    assert table["columns"] == rows[0] and [r[0] for r in table["data"]] == [0, 1, 2, 3]
    assert offline.summary["layerwise/layers"] == 4 and offline.summary["memory/max_peak_rss_gb"] > 0
