"""model=ds_v3_slice (random weights drawn on the device) and the calibration benchmark, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_cfg, run_job

from deepseek_ptq.devtools import bench
from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.kernels import dequant_torch
from deepseek_ptq.model.load import PACKAGED, RandomWeights, build_model, checkpoint_dir, resolve_args
from deepseek_ptq.model.parallel import Linear, Parallel
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.model.transformer import Transformer

SLICE = ModelArgs.from_json(PACKAGED / "ds_v3_slice.json")
# The slice's structure (sigmoid routing in groups, MLA with q_lora, FP8) with small matrices.
SMALL = {"dim": 256, "inter_dim": 512, "moe_inter_dim": 128, "n_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 128,
         "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32, "vocab_size": 512, "n_routed_experts": 16,
         "n_activated_experts": 4, "n_expert_groups": 4, "n_limited_groups": 2, "max_seq_len": 128}


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin
    yield
    torch.set_num_threads(before)


def test_ds_v3_slice_is_the_671b_geometry_with_random_weights(cache_dir):
    cfg = make_cfg(["model=ds_v3_slice"])
    args = resolve_args(cfg.model)
    assert (args.dim, args.inter_dim, args.moe_inter_dim, args.n_routed_experts, args.n_activated_experts) == \
        (7168, 18432, 2048, 256, 8)
    assert (args.n_layers, args.n_dense_layers, args.dtype, args.gate_bias) == (4, 1, "fp8", True)
    assert checkpoint_dir(cfg.model, args, 1) == RandomWeights(0)
    assert resolve_args(make_cfg(["model=ds_v3_slice", "model.n_layers=6"]).model).n_layers == 6
    with pytest.raises(UserError, match="ckpt_dir"):
        bad = make_cfg(["model=ds_v3_slice", "model.ckpt_dir=/somewhere"])
        checkpoint_dir(bad.model, resolve_args(bad.model), 1)


def test_random_init_writes_every_parameter_reproducibly():
    args = ModelArgs.from_dict({**SLICE.to_dict(), **SMALL})
    models = []
    for seed in (0, 0, 1):
        model = Transformer(args)
        for p in model.parameters():
            p.data.fill_(float("nan"))  # anything left unwritten stays NaN
        init_random_(model, seed)
        models.append(model)
    for name, p in models[0].named_parameters():
        assert torch.isfinite(p.float()).all(), name
    state = [dict(m.named_parameters()) for m in models]
    assert all(torch.equal(state[0][k].float(), state[1][k].float()) for k in state[0])
    assert not torch.equal(state[0]["layers.1.ffn.experts.3.w1.weight"].float(),
                           state[2]["layers.1.ffn.experts.3.w1.weight"].float())
    fp8 = [(n, m) for n, m in models[0].named_modules() if isinstance(m, Linear) and m.scale is not None]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn and bool((m.scale > 0).all()) for _, m in fp8)
    # real weight ~ N(0, 1/in) (model.synthetic), stored as FP8 codes with 128x128 block scales
    ratios = [dequant_torch(m.weight, m.scale, torch.float32).std().item() * m.in_features ** 0.5 for _, m in fp8]
    assert all(0.4 < r < 2.5 for r in ratios) and 0.9 < sum(ratios) / len(ratios) < 1.25


def test_build_model_draws_random_weights():
    args = ModelArgs.from_dict({**SLICE.to_dict(), **SMALL})
    model = build_model(args, RandomWeights(3), Parallel(), torch.device("cpu"), progress=False)
    expert = model.layers[1].ffn.experts[0].w2
    assert expert.weight.dtype == torch.float8_e4m3fn and torch.isfinite(expert.dequantized_weight()).all()


def test_ds_v3_slice_runs_as_a_job(cache_dir, tmp_path):
    small = [f"model.{k}={v}" for k, v in SMALL.items()]
    run = run_job(tmp_path, ["model=ds_v3_slice", "data=synthetic", *small])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["ckpt_dir"] == "random-weights(seed=0)"
    assert metrics["counts"]["missing_amax"] == 0


def test_calib_flops_count_every_gemm():
    """The floor's FLOPs against a count of the model's own linears (meta device: no memory)."""
    batch, seq = 8, 512
    with torch.device("meta"):
        model = Transformer(SLICE)
    tokens = batch * seq
    per_token, experts = 0, 0
    for name, m in model.named_modules():
        if isinstance(m, Linear) and name != "head":
            if ".experts." in name:
                experts += m.in_features * m.out_features
            else:
                per_token += m.in_features * m.out_features
    gates = sum(moe.gate.weight.numel() for _, moe in model.moe_layers())
    core = SLICE.n_layers * batch * SLICE.n_heads * seq * (seq + 1) / 2 * 2 * (SLICE.qk_head_dim + SLICE.v_head_dim)
    routed_share = SLICE.n_activated_experts / SLICE.n_routed_experts
    flops = bench.calib_flops(SLICE, batch, seq)
    assert flops["topk"] == pytest.approx(2 * tokens * (per_token + gates + experts * routed_share) + core, rel=1e-12)
    assert flops["all_experts"] == pytest.approx(2 * tokens * (per_token + gates + experts) + core, rel=1e-12)
    # FACTS: ~20 TFLOP a batch of 8 x 512 in top-k, ~285 TFLOP in all-experts
    assert flops["topk"] == pytest.approx(20e12, rel=0.05)
    assert flops["all_experts"] == pytest.approx(285e12, rel=0.05)
    assert flops["topk"] < flops["all_experts_min"] < flops["all_experts"]


def test_bench_runs_end_to_end_on_the_cpu(cache_dir, tmp_path, one_thread):
    out = tmp_path / "bench.json"
    results = bench.run_bench(["model=tiny", "data.batch_size=2", "data.seq_len=16"], ["topk", "all_experts"], 1, 1,
                              4, torch.device("cpu"), str(out))
    assert json.loads(out.read_text())["runs"] and results["ceilings"]["copy_GBps"] > 0
    assert [(r["mode"], r["path"]) for r in results["runs"]] == [
        ("topk", "fast"), ("topk", "plain"), ("all_experts", "fast"), ("all_experts", "plain")]
    for r in results["runs"]:
        assert r["s_per_batch"] > 0 and r["ratio"] > 0 and r["fixup_s"] >= 0
    for groups in results["fast_vs_plain"].values():
        assert all(g["identical"] == g["compared"] > 0 and g["missing"] == 0 for g in groups.values())
    fix = results["fixup_w8"]
    assert fix["local_experts_per_layer"] == 32 and fix["moe_layers"] == 1
    assert fix["synced_input_amax"] == 3 * 32 and fix["collectives"] == 1 and fix["first_s"] > 0
    assert fix["repeat_median_s"] > 0 and fix["tp_synced_amax"] > 0
    table = bench.format_table(results)
    assert "fast vs plain amax" in table and "fixup at W=8 shapes" in table


V32_SLICE = ModelArgs.from_json(PACKAGED / "ds_v32_slice.json")


def test_ds_v32_slice_is_the_v3_slice_plus_the_indexer(cache_dir):
    args = resolve_args(make_cfg(["model=ds_v32_slice"]).model)
    assert args == V32_SLICE and (args.index_n_heads, args.index_head_dim, args.index_topk) == (64, 128, 2048)
    assert {**args.to_dict(), "scale_fmt": None} == {**SLICE.to_dict(), "index_n_heads": 64, "index_head_dim": 128,
                                                     "index_topk": 2048}
    batch, seq = 8, 512
    with torch.device("meta"):
        model = Transformer(V32_SLICE)
    indexer = model.layers[0].attn.indexer
    params = sum(m.in_features * m.out_features for m in (indexer.wq_b, indexer.wk, indexer.weights_proj))
    score = 2 * batch * seq * seq * V32_SLICE.index_n_heads * V32_SLICE.index_head_dim
    extra = V32_SLICE.n_layers * (2 * batch * seq * params + score)
    v3, v32 = bench.calib_flops(SLICE, batch, seq), bench.calib_flops(V32_SLICE, batch, seq)
    assert v32["indexer"] == pytest.approx(extra, rel=1e-12)
    assert v32["topk"] - v3["topk"] == pytest.approx(extra, rel=1e-12)


def test_bench_measures_the_indexer_on_a_small_v32_slice(cache_dir, tmp_path, one_thread):
    small = [f"model.{k}={v}" for k, v in {**SMALL, "index_n_heads": 4, "index_topk": 16}.items()]
    results = bench.run_bench(["model=ds_v32_slice", *small, "data.batch_size=2", "data.seq_len=32"], ["topk"], 1, 0,
                              0, torch.device("cpu"), str(tmp_path / "bench.json"))
    ix = results["indexer"]
    assert ix["indexer_ms"] > 0 and ix["attention_with_ms"] > 0 and ix["attention_without_ms"] > 0
    # 32 tokens, top-16: queries 0..15 keep every earlier key, the later ones 16 of theirs
    assert ix["kept_share_of_causal_keys"] == pytest.approx((136 + 16 * 16) / 528)
    assert results["runs"][0]["s_per_batch"] > 0 and "indexer (2 x 32 tokens, top-16" in bench.format_table(results)


def test_small_v32_slice_streams_layer_by_layer_with_the_resident_amax(cache_dir, tmp_path):
    from test_layerwise import assert_same_run

    small = [f"model.{k}={v}" for k, v in {**SMALL, "index_n_heads": 4, "index_topk": 16}.items()]
    common = ["model=ds_v32_slice", "data=synthetic", "data.seq_len=32", *small]
    resident = run_job(tmp_path / "resident", common)
    streamed = run_job(tmp_path / "streamed", [*common, "calib.layerwise=true"])
    assert_same_run(resident, streamed)
