"""Hugging Face DeepSeek-V3 checkpoint -> DeepSeek's MP shards: renames, sharding, MTP skipped, round trip.

The Hugging Face checkpoint is written by a test helper from the tiny model's own shards with a literal rename
table (written out here, independent of ``deepseek_ptq.hf.names``), split over three files with an index and
carrying an extra multi-token-prediction layer; converting it back must give the generated shards at mp1 and
mp2 tensor for tensor, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_ptq.errors import UserError
from deepseek_ptq.hf.convert import convert
from deepseek_ptq.hf.names import args_from_hf_config, from_hf, hf_config, to_hf
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import load_shard, shard_name
from deepseek_ptq.model.load import PACKAGED, ensure_generated_checkpoint
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.transformer import Transformer

TINY = ModelArgs.from_json(PACKAGED / "tiny.json")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "convert_hf.py"
# FACTS.md, "Files": Hugging Face component -> DeepSeek component.
HF_TO_DS = {"self_attn": "attn", "mlp": "ffn", "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm",
            "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b",
            "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "embed_tokens": "embed",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "lm_head": "head",
            "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}
DS_TO_HF = {ds: hf for hf, ds in HF_TO_DS.items()}


def literal_hf_name(key: str) -> str:
    parts = [DS_TO_HF.get(p, p) for p in key.split(".")]
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


@pytest.fixture(scope="module")
def tiny_ckpt(cache_dir) -> Path:
    ensure_generated_checkpoint(TINY, 0, 1, cache_dir)
    return ensure_generated_checkpoint(TINY, 0, 2, cache_dir)  # same folder, mp2 shards added


def read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_hf_checkpoint(ckpt: Path, hf_dir: Path, files: int = 3) -> dict[str, torch.Tensor]:
    """The tiny model in Hugging Face layout (plus an MTP layer), over several files with an index."""
    state = {literal_hf_name(k): v for k, v in read(ckpt / shard_name(0, 1)).items()}
    mtp = TINY.n_layers  # DeepSeek-V3's layer 61: a full MoE block plus its own projections
    state.update({k.replace("model.layers.3.", f"model.layers.{mtp}."): v.clone() for k, v in state.items()
                  if k.startswith("model.layers.3.")})
    state[f"model.layers.{mtp}.eh_proj.weight"] = torch.ones(TINY.dim, 2 * TINY.dim, dtype=torch.bfloat16)
    state[f"model.layers.{mtp}.enorm.weight"] = torch.ones(TINY.dim, dtype=torch.bfloat16)
    hf_dir.mkdir()
    names = sorted(state)
    weight_map = {}
    for i in range(files):
        part = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        chunk = names[i::files]
        save_file({k: state[k] for k in chunk}, str(hf_dir / part))
        weight_map.update(dict.fromkeys(chunk, part))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 256,
              "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256, "num_hidden_layers": 4,
              "num_nextn_predict_layers": 1, "first_k_dense_replace": 1, "num_attention_heads": 8,
              "n_routed_experts": 16, "n_shared_experts": 2, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
              "topk_method": "noaux_tc", "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "q_lora_rank": 128,
              "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64,
              "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings":
                                                      4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                      "mscale_all_dim": 1.0},
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "tokenizer.json").write_text("{}")
    return state


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.mark.parametrize("world_size", [1, 2])
def test_round_trip(tiny_ckpt, tmp_path, world_size):
    write_hf_checkpoint(tiny_ckpt, tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "ds", world_size, progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(shard_name(r, world_size) for r in range(world_size))
    for rank in range(world_size):
        converted = read(out / shard_name(rank, world_size))
        assert same_tensors(converted, read(tiny_ckpt / shard_name(rank, world_size))), rank
        assert not [k for k in converted if k.startswith(f"layers.{TINY.n_layers}.")]
    assert ModelArgs.from_json(out / "config.json") == TINY
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob(".ds*"))
    model = Transformer(ModelArgs.from_json(out / "config.json"), Parallel(0, world_size))
    load_shard(model, out, 0, world_size)  # checks names, shapes and dtypes against the model


def test_names_and_config_map_both_ways(tiny_ckpt):
    keys = list(read(tiny_ckpt / shard_name(0, 1)))
    assert all(to_hf(k) == literal_hf_name(k) and from_hf(to_hf(k)) == k for k in keys)
    assert to_hf("layers.1.ffn.experts.3.w1.weight") == "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert to_hf("layers.0.attn.wkv_a.scale") == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    assert to_hf("layers.2.ffn.gate.bias") == "model.layers.2.mlp.gate.e_score_correction_bias"
    assert to_hf("head.weight") == "lm_head.weight" and to_hf("norm.weight") == "model.norm.weight"
    assert from_hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    for name in ("tiny", "deepseek_v3", "deepseek_16b"):
        args = ModelArgs.from_json(PACKAGED / f"{name}.json")
        hf = hf_config(args)
        if args.dtype == "fp8":  # the released FP8 checkpoints say so in their quantization_config
            hf["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        assert args_from_hf_config(hf) == args, name


def test_refusals(tiny_ckpt, tmp_path):
    write_hf_checkpoint(tiny_ckpt, tmp_path / "hf")
    with pytest.raises(UserError, match="cannot be split across 3 ranks"):
        convert(tmp_path / "hf", tmp_path / "ds3", 3, progress=False)
    extra = tmp_path / "hf" / "model-00004-of-00004.safetensors"
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, str(extra))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = extra.name
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="rotary_emb.inv_freq"):
        convert(tmp_path / "hf", tmp_path / "ds", 1, progress=False)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds3").exists() and not list(tmp_path.glob(".ds*"))


def test_script(tiny_ckpt, tmp_path):
    write_hf_checkpoint(tiny_ckpt, tmp_path / "hf")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "hf"), "--out", str(tmp_path / "ds"), "--mp", "2"],
                        capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "convert: 100%" in ok.stderr and "multi-token-prediction tensors skipped" in ok.stderr
    assert same_tensors(read(tmp_path / "ds" / shard_name(1, 2)), read(tiny_ckpt / shard_name(1, 2)))
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "hf"), "--out", str(tmp_path / "ds"), "--mp", "2"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0 and "already exists" in bad.stderr and "Traceback" not in bad.stderr
