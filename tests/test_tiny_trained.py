"""The trained tiny model shipped in the package (model=tiny): its format, its loading at any world size, and
that it behaves like a trained MoE (low held-out bits per byte, uneven routing). No training here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_job
from safetensors.torch import load_file

from deepseek_ptq.devtools.train import bits_per_byte, expert_loads, load_release, load_table
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import check_checkpoint, shard_name, shard_state_dict
from deepseek_ptq.model.load import PACKAGED, ensure_packaged_checkpoint, packaged_dir
from deepseek_ptq.pipeline.config import DataConfig
from deepseek_ptq.pipeline.data import make_batches

TINY_DIR = packaged_dir("tiny")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stored() -> dict[str, torch.Tensor]:
    return load_file(str(TINY_DIR / shard_name(0, 1)))


@pytest.fixture(scope="module")
def model():
    return load_release(TINY_DIR, CPU)


def test_stored_like_deepseeks_release(stored):
    check_checkpoint(TINY_DIR, 1)
    assert ModelArgs.from_json(TINY_DIR / "config.json") == ModelArgs.from_json(PACKAGED / "tiny.json")
    assert sum(p.stat().st_size for p in TINY_DIR.iterdir()) < 32 * 2**20
    for key, tensor in stored.items():
        if key.endswith(".scale"):
            weight = stored[key.removesuffix("scale") + "weight"]
            assert weight.dtype == torch.float8_e4m3fn and tensor.dtype == torch.float32
            assert tensor.shape == (-(-weight.shape[0] // 128), -(-weight.shape[1] // 128))
        elif key.endswith("gate.bias"):
            assert tensor.dtype == torch.float32
        elif key in ("embed.weight", "head.weight") or key.endswith(("gate.weight", "norm.weight")):
            assert tensor.dtype == torch.bfloat16, key
        else:
            assert tensor.dtype == torch.float8_e4m3fn and key.removesuffix("weight") + "scale" in stored, key
    # a trained selection bias, not the zeros it started from
    assert all(stored[f"layers.{i}.ffn.gate.bias"].abs().max() > 0.01 for i in (1, 2, 3))


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_w1_and_w2_runs_load_the_same_weights(tmp_path, cache_dir, stored):
    w1 = run_job(tmp_path / "w1", ["model=tiny"])
    w2 = run_job(tmp_path / "w2", ["model=tiny", "parallel=mp2"])
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (w1, w2))
    assert m1["status"] == m2["status"] == "ok"
    assert m1["ckpt_dir"] == str(TINY_DIR)  # W = 1 reads the package in place
    args = ModelArgs.from_json(TINY_DIR / "config.json")
    for rank in range(2):
        shard = load_file(str(Path(m2["ckpt_dir"]) / shard_name(rank, 2)))
        expected = shard_state_dict(stored, args, rank, 2)
        assert shard.keys() == expected.keys()
        for key in expected:
            assert torch.equal(shard[key].view(torch.uint8), expected[key].view(torch.uint8)), key


def test_w4_shards_come_from_the_one_stored_copy(cache_dir, stored):
    args = ModelArgs.from_json(TINY_DIR / "config.json")
    ckpt = ensure_packaged_checkpoint("tiny", args, 4, cache_dir)
    check_checkpoint(ckpt, 4)
    assert ckpt != TINY_DIR and not list(TINY_DIR.glob("*-mp4.safetensors"))
    experts = {k for r in range(4) for k in load_file(str(ckpt / shard_name(r, 4))) if ".experts." in k}
    assert experts == {k for k in stored if ".experts." in k}
    embed = torch.cat([load_file(str(ckpt / shard_name(r, 4)))["embed.weight"] for r in range(4)])
    assert torch.equal(embed, stored["embed.weight"])
    assert ensure_packaged_checkpoint("tiny", args, 4, cache_dir) == ckpt  # second call: the cached shards


def test_heldout_bits_per_byte_far_below_uniform(model):
    # 8 held-out samples of the default data set; measured 1.34 bits per byte (uniform guessing: 8).
    held = torch.cat(make_batches(DataConfig(), model.args.vocab_size, None, 8).heldout)
    assert bits_per_byte(model, held, 8, CPU) < 2.0


def test_routing_is_uneven_but_no_expert_is_idle(model):
    # 8 calibration samples x 256 bytes; measured max/min 3.5 to 4.1 per layer, every expert busy.
    calib = make_batches(DataConfig(num_samples=8), model.args.vocab_size, None, 0).calib
    for row in load_table(expert_loads(model, calib, CPU)):
        assert row["min"] > 0 and row["max_over_min"] > 2.0, row
