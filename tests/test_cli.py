"""The command line end to end (subprocesses): config validation, bad input, several ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, load_amax, with_fast

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import write_shards
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.synthetic import random_full_state
from deepseek_ptq.pipeline.launch import free_port

TINY = ModelArgs.from_json(PACKAGED / "tiny.json")


def cli(run_dir: Path, *overrides: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m deepseek_ptq`` with the FAST settings; ``env`` entries over this environment (None: unset)."""
    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "deepseek_ptq", f"hydra.run.dir={run_dir}", *with_fast(list(overrides))],
                          capture_output=True, text=True, timeout=timeout, env=env)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_failed(result: subprocess.CompletedProcess, run_dir: Path, *words: str) -> None:
    assert result.returncode != 0, result.stderr[-2000:]
    m = metrics(run_dir)
    assert m["status"] == "failed"
    for word in words:
        assert word in m["error"], m["error"]
    assert not (run_dir / "amax").exists() and not (run_dir / ".quant_summary.txt").exists()


@pytest.mark.parametrize("override,words", [
    ("model.no_such_key=1", ["no_such_key"]),
    ("data.num_samples=many", ["num_samples"]),
    ("quant=int3", ["quant", "nvfp4"]),
    ("calib.name=sometimes", ["sometimes", "topk"]),
])
def test_config_schema_rejects_bad_input(tmp_path, cache_dir, override, words):
    result = cli(tmp_path / "run", override)
    assert result.returncode != 0
    for word in words:
        assert word in result.stderr, result.stderr[-1500:]
    assert not (tmp_path / "run" / "amax").exists()


def test_unknown_preset_lists_known_ones(tmp_path, cache_dir):
    result = cli(tmp_path / "run", "quant.preset=NOPE_CFG")
    assert_failed(result, tmp_path / "run", "NOPE_CFG", "NVFP4_DEFAULT_CFG")


def test_missing_checkpoint_folder(tmp_path, cache_dir):
    result = cli(tmp_path / "run", f"model.ckpt_dir={tmp_path / 'nowhere'}")
    assert_failed(result, tmp_path / "run", "does not exist")


@pytest.fixture(scope="module")
def mp2_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    write_shards(random_full_state(TINY, 0), TINY, path, 2)
    (path / "config.json").write_text(json.dumps(TINY.to_dict()))
    return path


def test_shard_for_another_world_size(tmp_path, cache_dir, mp2_ckpt):
    result = cli(tmp_path / "run", f"model.ckpt_dir={mp2_ckpt}", "model.config=null")
    assert_failed(result, tmp_path / "run", "mp2", "world size 1")


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_missing_shard(tmp_path, cache_dir, mp2_ckpt):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((mp2_ckpt / "config.json").read_text())
    (partial / "model0-mp2.safetensors").symlink_to(mp2_ckpt / "model0-mp2.safetensors")
    result = cli(tmp_path / "run", f"model.ckpt_dir={partial}", "model.config=null", "parallel=mp2")
    assert_failed(result, tmp_path / "run", "model1-mp2.safetensors")


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_config_that_disagrees_with_checkpoint(tmp_path, cache_dir, mp2_ckpt):
    result = cli(tmp_path / "run", f"model.ckpt_dir={mp2_ckpt}", "model.config=null", "parallel=mp2", "model.dim=512")
    assert_failed(result, tmp_path / "run", "shape")


def test_zero_samples_and_empty_data(tmp_path, cache_dir):
    result = cli(tmp_path / "a", "data.num_samples=0")
    assert_failed(result, tmp_path / "a", "num_samples")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = cli(tmp_path / "b", f"data.paths=[{empty}]")
    assert_failed(result, tmp_path / "b", "empty")


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_mp1_mp2_same_weight_amax_close_input_amax(tmp_path, cache_dir):
    r1, r2 = tmp_path / "mp1", tmp_path / "mp2"
    # The KL tolerance below was measured on the random model; on the trained default, 2 x 64 held-out tokens
    # gave KL 0.036 (W=1) against 0.048 (W=2), every amax bound still holding.
    evaluation = ["model=tiny_random", "eval.enabled=true", "eval.num_samples=2"]
    assert cli(r1, *evaluation).returncode == 0
    result = cli(r2, "parallel=mp2", "logger=wandb", *evaluation)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(r2)
    assert m["status"] == "ok" and m["world_size"] == 2 and m["counts"]["fixup_collectives"] == 1
    assert len(list((r2 / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs
    # Evaluation at W=2 sees the same model: the reference's cross-entropy differs by bf16 summation order
    # only; the KL also by the slightly different input amax (see below).
    e1, e2 = metrics(r1)["eval"], m["eval"]
    print("eval W=1", e1, "W=2", e2)
    assert e1["tokens"] == e2["tokens"]
    assert e2["bpb_ref"] == pytest.approx(e1["bpb_ref"], rel=1e-2)
    assert e2["kl"] == pytest.approx(e1["kl"], rel=0.3)
    a1, a2 = load_amax(r1), load_amax(r2)
    assert a1.keys() == a2.keys()
    for key in a1:
        if "weight_quantizer" in key:
            assert torch.equal(a1[key], a2[key]), key
        elif ".experts." in key and ".w2." in key:
            # The w2 input depends on which tokens the gate routes; a bf16 rounding difference can flip a
            # near-tied top-k choice and change the max over routed tokens (seen: 10.9 vs 12.0).
            assert torch.allclose(a1[key], a2[key], rtol=0.25), (key, a1[key], a2[key])
        else:
            # Row-parallel partial sums are added in another order at W=2: bf16 rounding (2^-8 relative)
            # that compounds through the residual stream; 5% bounds it with margin.
            assert torch.allclose(a1[key], a2[key], rtol=5e-2), (key, a1[key], a2[key])


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_rank_failure_ends_the_job_with_its_error(tmp_path, cache_dir, mp2_ckpt):
    bad = tmp_path / "bad"
    state = random_full_state(TINY, 0)
    state["layers.2.ffn.experts.12.w1.scale"][0, 0] = float("nan")  # rank 1's expert at mp2
    write_shards(state, TINY, bad, 2)
    (bad / "config.json").write_text(json.dumps(TINY.to_dict()))
    start = time.time()
    result = cli(tmp_path / "run", f"model.ckpt_dir={bad}", "model.config=null", "parallel=mp2",
                 "parallel.timeout_s=60")
    assert time.time() - start < 90
    assert_failed(result, tmp_path / "run", "layers.2.ffn.experts.12.w1")
    assert metrics(tmp_path / "run")["failed_rank"] == 1


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_short_calibration_leaves_experts_without_tokens_and_still_syncs(tmp_path, cache_dir):
    short = ["data.num_samples=1", "data.seq_len=4", "data.batch_size=1"]
    single, mp4 = tmp_path / "mp1", tmp_path / "mp4"
    assert cli(single, *short).returncode == 0
    result = cli(mp4, *short, "parallel=mp4")
    assert result.returncode == 0, result.stderr[-3000:]
    m1, m4 = metrics(single), metrics(mp4)
    assert m4["status"] == "ok" and m4["counts"]["uncalibrated_experts"] > 0
    assert m4["counts"]["uncalibrated_experts"] == m1["counts"]["uncalibrated_experts"]
    a1, a4 = load_amax(single), load_amax(mp4)
    assert a1.keys() == a4.keys()
    synced = [k for k in a1 if ".experts." in k and "input_quantizer" in k]
    assert len(synced) == 3 * 3 * 16
    for key in synced:  # every expert, with or without tokens, carries its layer's max
        assert torch.allclose(a1[key].float(), a4[key].float(), rtol=5e-2), key


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_torchrun_ranks_share_one_run_directory(tmp_path, cache_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    run_dir, temp = tmp_path / "run", tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    result = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "deepseek_ptq",
                             f"hydra.run.dir={run_dir}", *FAST, "parallel=mp2"],
                            capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(run_dir)["status"] == "ok" and metrics(run_dir)["world_size"] == 2
    assert sorted(p.name for p in (run_dir / "amax").iterdir()) == ["amax_dict_rank0-mp2.pt", "amax_dict_rank1-mp2.pt"]
    assert (run_dir / "rank1.log").exists() and not list(tmp_path.glob("outputs"))
    assert not list(temp.glob("deepseek_ptq_rank*"))  # rank 1's scratch folder for Hydra goes with the rank


def test_torchrun_world_size_mismatch_fails_clearly(tmp_path, cache_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    run_dir = tmp_path / "run"
    result = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "deepseek_ptq",
                             f"hydra.run.dir={run_dir}", *FAST, "parallel=mp4"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert metrics(run_dir)["status"] == "failed" and "4 ranks" in metrics(run_dir)["error"]


@pytest.mark.parametrize("joined", [True, False])
def test_run_stopped_by_sigterm_records_failed(tmp_path, cache_dir, joined):
    # torchrun / srun end the other ranks with SIGTERM when one fails, SLURM at the time limit: not "running".
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"} if joined else {})
    proc = subprocess.Popen([sys.executable, "-m", "deepseek_ptq", f"hydra.run.dir={run_dir}", *with_fast([])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 60
    while not (run_dir / "run.log").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    m = metrics(run_dir)
    assert m["status"] == "failed" and "signal 15" in m["error"], m
    assert not (run_dir / "amax").exists()


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_strict_fails_when_experts_keep_no_amax(tmp_path, cache_dir):
    short = ["data.num_samples=1", "data.seq_len=4", "data.batch_size=1", "calib.sync=false"]
    lenient = cli(tmp_path / "a", *short)
    assert lenient.returncode == 0 and metrics(tmp_path / "a")["counts"]["missing_amax"] > 0
    assert "input_quantizer" in metrics(tmp_path / "a")["missing_amax"][0]
    assert_failed(cli(tmp_path / "b", *short, "calib.strict=true"), tmp_path / "b", "no amax")


def test_overflowing_activations_name_the_module(tmp_path, cache_dir):
    ckpt = tmp_path / "ckpt"
    state = random_full_state(TINY, 0)
    state["layers.1.attn_norm.weight"].fill_(3e38)  # finite weight, but activations overflow to inf
    write_shards(state, TINY, ckpt, 1)
    (ckpt / "config.json").write_text(json.dumps(TINY.to_dict()))
    result = cli(tmp_path / "run", f"model.ckpt_dir={ckpt}", "model.config=null")
    assert_failed(result, tmp_path / "run", "non-finite activations", "layers.1")


def test_in_process_run_puts_back_the_signal_handlers(tmp_path, cache_dir):
    # execute() turns SIGTERM and SIGINT into an exception while a job runs; afterwards the caller's handlers are back.
    from conftest import run_job

    def mine(signum, frame):
        raise AssertionError("not expected to be called")

    before = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_job(tmp_path / "ok", ["data.num_samples=4"])
        assert metrics(tmp_path / "ok" / "run")["status"] == "ok"
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
        with pytest.raises(Exception, match="num_samples"):
            run_job(tmp_path / "bad", ["data.num_samples=0"])
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("model", ["deepseek_v3", "deepseek_16b"])
def test_real_size_model_without_checkpoint_fails_at_once(tmp_path, cache_dir, model):
    """Not a random 671B model drawn in host memory for minutes: one error naming model.ckpt_dir, in seconds."""
    result = cli(tmp_path / "run", f"model={model}", "logger=none", timeout=60)
    assert_failed(result, tmp_path / "run", f"model={model} needs its checkpoint", "model.ckpt_dir")
    assert "Traceback" not in result.stderr
