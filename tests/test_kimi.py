"""Kimi-K2: its geometry, its Hugging Face config and checkpoint, its tiktoken tokenizer, tiny_kimi end to end
(calibration in both modes, evaluation, layer streaming, export), and the refusal of INT4 (compressed-tensors)
checkpoints such as Kimi-K2-Thinking."""

from __future__ import annotations

import base64
import dataclasses
import json
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import load_amax, make_cfg, run_job
from test_cli import assert_failed, cli, metrics
from test_convert_hf import literal_hf_name, read, same_tensors
from test_layerwise import assert_same_run
from tiktoken._educational import bpe_train

from deepseek_ptq.errors import UserError
from deepseek_ptq.hf.convert import convert
from deepseek_ptq.hf.export import export_run
from deepseek_ptq.hf.names import args_from_hf_config, from_hf, hf_config
from deepseek_ptq.model.args import ModelArgs, refuse_compressed_weights
from deepseek_ptq.model.checkpoint import ShardReader, expert_of, shard_name, write_shards
from deepseek_ptq.model.load import PACKAGED, ensure_generated_checkpoint
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.synthetic import random_full_state
from deepseek_ptq.model.transformer import Transformer
from deepseek_ptq.pipeline.data import make_batches
from deepseek_ptq.pipeline.tokenizer import MAX_RUN, TiktokenTokenizer, tokenizer_file

KIMI = ModelArgs.from_json(PACKAGED / "kimi_k2.json")
TINY_KIMI = ModelArgs.from_json(PACKAGED / "tiny_kimi.json")
EVAL = ["eval.enabled=true", "eval.num_samples=4"]

# Kimi-K2-Instruct's config.json on Hugging Face (the model's own fields; auto_map and token ids left out).
KIMI_K2_INSTRUCT_HF = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 131072,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
}
# Kimi-K2-Thinking's quantization_config: routed experts INT4 (compressed-tensors), everything else left out.
K2_THINKING_QUANT = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}


def test_kimi_k2_at_w8_holds_48_experts_a_rank():
    KIMI.check_world_size(8, whole_fp8_blocks=True)  # every split dim whole 128-blocks: a converted mp8 loads
    rank = 5
    with torch.device("meta"):
        model = Transformer(KIMI, Parallel(rank, 8))
    moe = model.moe_layers()
    assert [i for i, _ in moe] == list(range(1, 61))  # 1 dense layer, 60 MoE layers
    for _, layer in moe:
        assert [i for i, _ in layer.local_experts()] == list(range(48 * rank, 48 * rank + 48))
        assert sum(e is not None for e in layer.experts) == 48 and len(layer.experts) == 384
    layer = moe[0][1]
    assert tuple(layer.gate.weight.shape) == (384, 7168) and layer.gate.bias is not None
    assert (layer.gate.topk, layer.gate.n_groups, layer.gate.route_scale) == (8, 1, 2.827)
    assert tuple(layer.experts[48 * rank].w1.weight.shape) == (2048, 7168)
    assert tuple(layer.shared_experts.w1.weight.shape) == (2048 // 8, 7168)
    attn = model.layers[0].attn
    assert attn.n_local_heads == 8 and tuple(attn.wq_b.weight.shape) == (8 * 192, 1536)
    assert tuple(model.embed.weight.shape) == (163840 // 8, 7168)
    assert tuple(model.layers[0].ffn.w1.weight.shape) == (18432 // 8, 7168)


def test_kimi_hf_config_maps_to_model_args():
    assert args_from_hf_config(KIMI_K2_INSTRUCT_HF) == KIMI
    assert KIMI.gate_bias and KIMI.n_expert_groups == KIMI.n_limited_groups == 1
    assert (KIMI.rope_theta, KIMI.rope_factor, KIMI.beta_fast, KIMI.beta_slow) == (50000.0, 32, 1, 1)
    # The export's config.json (DeepseekV3ForCausalLM) reads back to the same model.
    exported = {**hf_config(KIMI), "quantization_config": KIMI_K2_INSTRUCT_HF["quantization_config"]}
    assert args_from_hf_config(exported) == KIMI
    assert args_from_hf_config({**hf_config(TINY_KIMI), "quantization_config": {"quant_method": "fp8"}}) == TINY_KIMI


@pytest.fixture(scope="module")
def tiny_kimi_ckpt(cache_dir) -> Path:
    for world_size in (1, 2, 4, 8):
        path = ensure_generated_checkpoint(TINY_KIMI, 0, world_size, cache_dir)
    return path


def test_tiny_kimi_shards_at_every_world_size(tiny_kimi_ckpt):
    full = read(tiny_kimi_ckpt / shard_name(0, 1))
    for world_size in (2, 4, 8):
        for rank in range(world_size):
            experts = {expert_of(k) for k in read(tiny_kimi_ckpt / shard_name(rank, world_size))} - {None}
            per_rank = 16 // world_size
            assert experts == set(range(rank * per_rank, (rank + 1) * per_rank)), (world_size, rank)
        with ShardReader(tiny_kimi_ckpt, world_size) as reader:
            assert set(reader.keys()) == set(full)
            assert all(torch.equal(reader.get(k).view(torch.uint8), full[k].view(torch.uint8)) for k in full)


def write_kimi_hf_checkpoint(ckpt: Path, hf_dir: Path, tokenizer_dir: Path) -> None:
    """tiny_kimi in Hugging Face layout, with a Kimi config.json and Kimi's tokenizer files (no tokenizer.json)."""
    state = {literal_hf_name(k): v for k, v in read(ckpt / shard_name(0, 1)).items()}
    hf_dir.mkdir()
    from safetensors.torch import save_file

    save_file(state, str(hf_dir / "model.safetensors"))
    a = TINY_KIMI
    config = {**KIMI_K2_INSTRUCT_HF, "vocab_size": a.vocab_size, "hidden_size": a.dim, "intermediate_size": a.inter_dim,
              "moe_intermediate_size": a.moe_inter_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": a.n_heads, "n_routed_experts": a.n_routed_experts,
              "num_experts_per_tok": a.n_activated_experts, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
              "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
              "v_head_dim": a.v_head_dim}
    (hf_dir / "config.json").write_text(json.dumps(config))
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (hf_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    (hf_dir / "tokenization_kimi.py").write_text("# Kimi's tokenizer class (named by tokenizer_config.json)\n")


@pytest.fixture(scope="module")
def kimi_tokenizer(tmp_path_factory) -> Path:
    """A small BPE trained with tiktoken on one stdlib file, written as Kimi ships its tokenizer: tiktoken.model
    (``<base64 token> <rank>`` lines) and tokenizer_config.json naming two of the special tokens after the ranks."""
    folder = tmp_path_factory.mktemp("kimi_tokenizer")
    corpus = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ranks = bpe_train(corpus, 300, r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""", visualise=None)
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    (folder / "tiktoken.model").write_text("".join(lines))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"300": {"content": "[BOS]", "special": True}, "301": {"content": "[EOS]", "special": True}},
        "tokenizer_class": "TikTokenTokenizer"}))
    return folder


def test_kimi_hf_checkpoint_converts(tiny_kimi_ckpt, kimi_tokenizer, tmp_path):
    write_kimi_hf_checkpoint(tiny_kimi_ckpt, tmp_path / "hf", kimi_tokenizer)
    out = convert(tmp_path / "hf", tmp_path / "ds", 2, progress=False)
    for rank in range(2):
        assert same_tensors(read(out / shard_name(rank, 2)), read(tiny_kimi_ckpt / shard_name(rank, 2))), rank
    assert ModelArgs.from_json(out / "config.json") == TINY_KIMI
    assert all((out / n).exists() for n in ("tiktoken.model", "tokenizer_config.json", "tokenization_kimi.py"))


TEXTS = {
    "a.txt": "Kimi-K2 reuses DeepSeek-V3's architecture. It's 1T parameters; 32B are active.\n" * 40,
    "b.txt": "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)\n[EOS]\n" * 40,
    "c.txt": "混合专家模型 mixture of experts, 384 routed experts\n\n\t" * 40 + " " * (MAX_RUN + 5) + "end\n",
}


def test_tiktoken_tokenizer_round_trips_through_text_data(kimi_tokenizer, tmp_path):
    tok = TiktokenTokenizer(kimi_tokenizer / "tiktoken.model")
    assert tok.vocab_size == 300 + 256
    for name, text in TEXTS.items():
        (tmp_path / name).write_text(text)
        ids = tok.encode(text)
        assert tok.decode(ids.tolist()) == text, name
    assert tok.encode("[EOS]").tolist() == [301] and tok.encode("<|reserved_token_555|>").tolist() == [555]
    cfg = make_cfg(["model=tiny_kimi", "model.vocab_size=1024", f"data.tokenizer={kimi_tokenizer / 'tiktoken.model'}",
                    f"data.paths=['{tmp_path}/*.txt']", "data.seq_len=48", "data.num_samples=12", "data.batch_size=4"])
    batches = make_batches(cfg.data, 1024, None, heldout_samples=4)
    assert not batches.byte_level and len(batches.calib) == 3
    stream = b"".join(t.encode() for t in TEXTS.values())
    samples = torch.cat(batches.calib + batches.heldout)
    assert samples.shape == (16, 48) and int(samples.max()) < tok.vocab_size
    for sample in samples:  # every sample is the encoding of a stretch of the text
        assert tok.encoding.decode_bytes(sample.tolist()) in stream
    assert 301 in tok.encode(TEXTS["b.txt"]).tolist()  # the special token written in the text


def test_checkpoint_tiktoken_model_is_used_end_to_end(kimi_tokenizer, tmp_path, cache_dir):
    """A checkpoint folder that ships tiktoken.model (no tokenizer.json): data=text finds and uses it."""
    args = dataclasses.replace(TINY_KIMI, vocab_size=1024)
    ckpt = tmp_path / "ckpt"
    write_shards(random_full_state(args, 0), args, ckpt, 1)
    (ckpt / "config.json").write_text(json.dumps(args.to_dict()))
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (ckpt / name).write_bytes((kimi_tokenizer / name).read_bytes())
    result = cli(tmp_path / "run", "model=tiny_kimi", f"model.ckpt_dir={ckpt}", "model.config=null",
                 "eval.enabled=true", "eval.num_samples=2")
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["tokens_calibrated"] == 8 * 64
    assert "ce_ref" in m["eval"] and "bpb_ref" not in m["eval"]  # tokens, not bytes: cross-entropy in nats
    (ckpt / "tiktoken.model").unlink()
    with pytest.raises(UserError, match="neither tokenizer.json nor tiktoken.model"):
        tokenizer_file(None, str(ckpt), 1024)


@pytest.fixture(scope="module")
def tiny_kimi_runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    return {mode: run_job(tmp_path_factory.mktemp(mode), ["model=tiny_kimi", f"calib={mode}", *EVAL])
            for mode in ("topk", "all_experts")}


def test_tiny_kimi_calibrates_and_evaluates(tiny_kimi_runs):
    for mode, run_dir in tiny_kimi_runs.items():
        m = metrics(run_dir)
        assert m["status"] == "ok" and m["model"] == "tiny_kimi" and m["calib"] == mode
        assert m["counts"]["missing_amax"] == 0 and m["counts"]["uncalibrated_experts"] == 0
        assert m["eval"]["tokens"] > 0 and 0 < m["eval"]["kl"] < 10 and "bpb_ref" in m["eval"]
        # No expert groups, top-2: every token reaches 2 of the 16 experts in each of the 2 MoE layers.
        assert {layer: s["total"] for layer, s in m["stats"]["expert_tokens"].items()} == {"1": 2 * 512, "2": 2 * 512}
        with open(run_dir / "stats" / "expert_tokens.csv") as f:
            assert len(f.read().splitlines()) == 1 + 2 * 16
    # top-k + sync: the expert input amax became their layer's max (w1, w2, w3 of 16 experts in 2 layers).
    assert metrics(tiny_kimi_runs["topk"])["counts"]["synced_input_amax"] == 2 * 16 * 3


@pytest.mark.parametrize("mode", ["topk", "all_experts"])
def test_tiny_kimi_streamed_equals_resident(tiny_kimi_runs, tmp_path, mode):
    streamed = run_job(tmp_path / "streamed", ["model=tiny_kimi", f"calib={mode}", *EVAL, "calib.layerwise=true"])
    assert_same_run(tiny_kimi_runs[mode], streamed)
    assert metrics(streamed)["layerwise"]["layers"] == TINY_KIMI.n_layers


def test_tiny_kimi_exports_and_reads_back(tiny_kimi_runs, tiny_kimi_ckpt, tmp_path):
    out = export_run(tiny_kimi_runs["topk"], tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["n_group"] == 1 and config["n_routed_experts"] == 16
    # The export's config reads back as tiny_kimi (its modelopt quantization_config is not FP8 blocks: bf16).
    assert args_from_hf_config(config) == dataclasses.replace(TINY_KIMI, dtype="bf16")
    # Every exported tensor but the quantization scales maps back to one of tiny_kimi's, and every one is there.
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    plain = [n for n in names if not n.endswith(("weight_scale", "weight_scale_2", "input_scale"))]
    model_keys = {k for k in read(tiny_kimi_ckpt / shard_name(0, 1)) if not k.endswith(".scale")}
    assert sorted(from_hf(n) for n in plain) == sorted(model_keys)
    assert len([n for n in names if n.endswith("mlp.gate.e_score_correction_bias")]) == TINY_KIMI.n_moe_layers


def test_int4_checkpoint_is_refused_by_the_converter(tiny_kimi_ckpt, kimi_tokenizer, tmp_path):
    write_kimi_hf_checkpoint(tiny_kimi_ckpt, tmp_path / "hf", kimi_tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "quantization_config": K2_THINKING_QUANT}))
    with pytest.raises(UserError, match="compressed-tensors") as err:
        convert(tmp_path / "hf", tmp_path / "ds", 1, progress=False)
    assert "INT4 routed experts" in str(err.value) and "4-bit int in groups of 32" in str(err.value)
    assert "FP8 or BF16" in err.value.fix
    assert not (tmp_path / "ds").exists()
    # Kimi-K2.5 and later nest the text model's config (and its quantization) in text_config.
    with pytest.raises(UserError, match="INT4"):
        refuse_compressed_weights({"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2",
                                                                             "quantization_config": K2_THINKING_QUANT}},
                                  "config.json")
    refuse_compressed_weights(KIMI_K2_INSTRUCT_HF, "config.json")  # FP8 blocks: read as always


def test_int4_checkpoint_is_refused_before_the_run(tmp_path, cache_dir):
    ckpt = tmp_path / "Kimi-K2-Thinking"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({**KIMI_K2_INSTRUCT_HF, "quantization_config": K2_THINKING_QUANT}))
    result = cli(tmp_path / "run", "model=kimi_k2", f"model.ckpt_dir={ckpt}")
    assert_failed(result, tmp_path / "run", "compressed-tensors", "INT4 routed experts", "Kimi-K2-Thinking")
    assert "Traceback" not in result.stderr and "FP8 or BF16" in result.stderr


@pytest.mark.slow  # two spawned ranks
def test_tiny_kimi_at_w2_has_the_same_expert_weight_amax(tiny_kimi_runs, tmp_path):
    result = cli(tmp_path / "run", "model=tiny_kimi", "parallel=mp2")
    assert result.returncode == 0, result.stderr[-3000:]
    w1, w2 = load_amax(tiny_kimi_runs["topk"]), load_amax(tmp_path / "run")
    experts = [k for k in w1 if ".experts." in k and "weight_quantizer" in k]
    assert len(experts) == 2 * 16 * 3 and set(w1) == set(w2)
    assert all(torch.equal(w1[k], w2[k]) for k in experts)
    assert metrics(tmp_path / "run")["world_size"] == 2
