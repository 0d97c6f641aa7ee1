"""model=tiny_v32 (DeepSeek-V3.2: the lightning indexer) through every stage: calibration in both modes,
evaluation, compare, layer streaming, export (the indexer in its stored form, or FP8) and the Hugging Face
converter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import load_amax, run_job
from test_cli import cli
from test_convert_hf import HF_TO_DS, read, same_tensors
from test_export import read_export
from test_layerwise import assert_same_run

from deepseek_ptq.analysis import compare
from deepseek_ptq.hf.convert import convert
from deepseek_ptq.hf.export import export_run
from deepseek_ptq.hf.names import args_from_hf_config, from_hf, hf_config
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import shard_name
from deepseek_ptq.model.load import PACKAGED, ensure_generated_checkpoint

V32 = ["model=tiny_v32", "eval.enabled=true", "eval.num_samples=4"]
TINY_V32 = ModelArgs.from_json(PACKAGED / "tiny_v32.json")
INDEXER_LINEARS = ("wq_b", "wk")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on 2 shared cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v32")
    return {name: run_job(root / name, V32 + extra) for name, extra in (
        ("topk", []), ("all_experts", ["calib=all_experts"]), ("indexer_fp8", ["quant.indexer=fp8"]))}


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_calibrates_in_both_modes_and_evaluates(runs):
    for name, run in runs.items():
        m = metrics(run)
        assert m["status"] == "ok" and m["model"] == "tiny_v32", name
        assert m["eval"]["kl"] > 0 and m["counts"]["missing_amax"] == 0, name
    amax = {name: load_amax(run) for name, run in runs.items()}
    # Off by default: no indexer quantizer calibrated; quant.indexer=fp8: wq_b and wk, weights and inputs.
    assert not [k for k in amax["topk"] if ".indexer." in k]
    fp8 = sorted(k for k in amax["indexer_fp8"] if ".indexer." in k)
    assert fp8 == sorted(f"layers.{i}.attn.indexer.{m}.{q}_quantizer._amax" for i in range(4)
                         for m in INDEXER_LINEARS for q in ("weight", "input"))
    assert metrics(runs["all_experts"])["calib"] == "all_experts"
    summary = (runs["topk"] / ".quant_summary.txt").read_text()
    assert "layers.2.attn.indexer.wk.input_quantizer" in summary and "weights_proj" not in summary
    excluded = json.loads((runs["topk"] / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert {"layers.2.attn.indexer.wq_b", "layers.2.attn.indexer.wk", "layers.*.attn.indexer.weights_proj"} <= set(excluded)


def test_compare_runs(runs, tmp_path):
    assert compare.main([str(runs["topk"]), str(runs["all_experts"]), "--out", str(tmp_path / "cmp")]) == 0
    groups = json.loads((tmp_path / "cmp.json").read_text())["groups"]
    assert groups["expert weight"]["identical"] == groups["expert weight"]["compared"] == 3 * 16 * 3


@pytest.mark.parametrize("overrides", [["calib=topk"], ["calib=all_experts", "quant.indexer=fp8"]],
                         ids=["topk", "all_experts-indexer_fp8"])
def test_streamed_run_equals_resident_run(tmp_path, cache_dir, overrides):
    resident = run_job(tmp_path / "resident", V32 + overrides)
    streamed = run_job(tmp_path / "streamed", V32 + overrides + ["calib.layerwise=true"])
    assert_same_run(resident, streamed)


def test_export_keeps_the_indexer_stored_or_writes_it_fp8(runs, tmp_path, cache_dir):
    ckpt = read(Path(metrics(runs["topk"])["ckpt_dir"]) / shard_name(0, 1))
    for name in ("topk", "indexer_fp8"):
        out = export_run(runs[name], tmp_path / name, unquantized="bf16", progress=False)
        tensors = read_export(out)
        indexer = {k: v for k, v in tensors.items() if ".indexer." in k}
        quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["DeepseekV32ForCausalLM"] and config["index_topk"] == 32
        # The export's config converts back (dtype aside: a modelopt checkpoint is no FP8-block release).
        assert dataclasses.replace(args_from_hf_config(config), dtype="fp8") == TINY_V32
        assert "model.layers.1.self_attn.indexer.weights_proj" in quant["exclude_modules"]
        for layer in range(4):
            prefix = f"model.layers.{layer}.self_attn.indexer"
            for key in ("k_norm.weight", "k_norm.bias", "weights_proj.weight"):  # never quantized: as stored (bf16)
                assert torch.equal(indexer[f"{prefix}.{key}"], ckpt[from_hf(f"{prefix}.{key}")]), key
            for linear in INDEXER_LINEARS:
                weight = indexer[f"{prefix}.{linear}.weight"]
                if name == "topk":  # unquantized: the released FP8 blocks, although --unquantized bf16
                    assert f"{prefix}.{linear}" in quant["exclude_modules"]
                    for key in ("weight", "weight_scale_inv"):
                        assert same_tensors({key: indexer[f"{prefix}.{linear}.{key}"]},
                                            {key: ckpt[from_hf(f"{prefix}.{linear}.{key}")]})
                else:  # FP8 per tensor with a static input scale, like every FP8 linear of the export
                    assert quant["quantized_layers"][f"{prefix}.{linear}"] == {"quant_algo": "FP8"}
                    assert weight.dtype == torch.float8_e4m3fn and indexer[f"{prefix}.{linear}.input_scale"].numel() == 1
        assert tensors["model.layers.1.self_attn.q_b_proj.weight"].dtype == torch.bfloat16  # other unquantized: bf16


def test_hugging_face_checkpoint_converts_to_the_shards(tmp_path, cache_dir):
    """A V3.2 checkpoint in Hugging Face names (the indexer keeps its own: self_attn.indexer.wq_b) -> mp1, mp2."""
    ds_to_hf = {ds: hf for hf, ds in HF_TO_DS.items()}
    ckpt = ensure_generated_checkpoint(TINY_V32, 0, 1, cache_dir)
    ensure_generated_checkpoint(TINY_V32, 0, 2, cache_dir)

    def literal(key: str) -> str:
        parts = key.split(".")
        inside = [i > 0 and parts[i - 1] == "indexer" for i in range(len(parts))]
        named = [p if keep or (p == "bias" and parts[i - 1] == "k_norm") else ds_to_hf.get(p, p)
                 for i, (p, keep) in enumerate(zip(parts, inside))]
        if key.endswith(".scale"):
            named[-1] = "weight_scale_inv"
        return ".".join(named) if named[0] == "lm_head" else "model." + ".".join(named)

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    state = {literal(k): v for k, v in read(ckpt / shard_name(0, 1)).items()}
    assert "model.layers.0.self_attn.indexer.wq_b.weight_scale_inv" in state
    assert "model.layers.0.self_attn.indexer.k_norm.bias" in state
    from safetensors.torch import save_file

    save_file(state, str(hf_dir / "model.safetensors"))
    config = {**hf_config(TINY_V32), "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                             "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}}
    (hf_dir / "config.json").write_text(json.dumps(config))
    for world_size in (1, 2):
        out = convert(hf_dir, tmp_path / f"ds{world_size}", world_size, progress=False)
        for rank in range(world_size):
            assert same_tensors(read(out / shard_name(rank, world_size)), read(ckpt / shard_name(rank, world_size)))
        assert ModelArgs.from_json(out / "config.json") == TINY_V32
    v32 = ModelArgs.from_json(PACKAGED / "deepseek_v32.json")
    assert args_from_hf_config({**hf_config(v32), "quantization_config": config["quantization_config"]}) == v32
    # The indexer is replicated: each mp2 shard holds it whole.
    half = read(tmp_path / "ds2" / shard_name(1, 2))
    assert half["layers.0.attn.indexer.wq_b.weight"].shape == (4 * 128, TINY_V32.q_lora_rank)


@pytest.mark.slow  # two spawned ranks
def test_two_ranks_calibrate_the_same_model(runs, tmp_path):
    run = tmp_path / "mp2"
    result = cli(run, *V32, "parallel=mp2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(run)["checkpoint"] == metrics(runs["topk"])["checkpoint"]
    assert compare.main([str(runs["topk"]), str(run), "--out", str(tmp_path / "cmp")]) == 0
    groups = json.loads((tmp_path / "cmp.json").read_text())["groups"]
    assert groups["expert weight"]["identical"] == groups["expert weight"]["compared"] == 3 * 16 * 3
