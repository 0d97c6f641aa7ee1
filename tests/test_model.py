"""The model's pieces against explicit recomputations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import load_shard, shard_name, write_shards
from deepseek_ptq.model.kernels import dequant_torch, quantize_fp8_blocks
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.moe import Gate, MoE
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.synthetic import random_full_state
from deepseek_ptq.model.transformer import Transformer

TINY = ModelArgs.from_json(PACKAGED / "tiny.json")


def test_fp8_block_dequant_matches_explicit_per_block_multiply():
    gen = torch.Generator().manual_seed(0)
    codes = (torch.randn(300, 200, generator=gen) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=gen) + 0.1
    expected = torch.empty(300, 200)
    for i in range(300):
        for j in range(0, 200, 8):
            expected[i, j:j + 8] = codes[i, j:j + 8].float() * scale[i // 128, j // 128]
    assert torch.equal(dequant_torch(codes, scale, torch.float32), expected)


def test_fp8_quantize_round_trip_is_close():
    w = torch.randn(256, 384)
    codes, scale = quantize_fp8_blocks(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    assert (dequant_torch(codes, scale, torch.float32) - w).abs().max() < 0.07 * w.abs().max()


def _gate(score_func: str, groups: int, bias: bool) -> Gate:
    args = ModelArgs(dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=groups,
                     n_limited_groups=2 if groups > 1 else 1, score_func=score_func, route_scale=2.5, gate_bias=bias)
    gate = Gate(args)
    gen = torch.Generator().manual_seed(1)
    gate.weight.data = torch.randn(8, 8, generator=gen).bfloat16()
    if bias:
        gate.bias.data = torch.randn(8, generator=gen) * 0.3
    return gate


def _hand_route(gate: Gate, x: torch.Tensor):
    out_w, out_i = [], []
    for row in x:
        logits = (gate.weight.float() @ row.float()).bfloat16()
        scores = logits.float().softmax(-1) if gate.score_func == "softmax" else logits.sigmoid().float()
        sel = scores + (gate.bias if gate.bias is not None else 0)
        allowed = list(range(8))
        if gate.n_groups > 1:
            size = 8 // gate.n_groups
            group_score = []
            for g in range(gate.n_groups):
                part = sel[g * size:(g + 1) * size]
                group_score.append(part.max() if gate.bias is None else part.sort(descending=True)[0][:2].sum())
            keep = sorted(range(gate.n_groups), key=lambda g: -float(group_score[g]))[:gate.topk_groups]
            allowed = [e for e in range(8) if e // size in keep]
        chosen = sorted(allowed, key=lambda e: -float(sel[e]))[:gate.topk]
        w = scores[chosen]
        if gate.score_func == "sigmoid":
            w = w / w.sum()
        out_w.append(w * gate.route_scale)
        out_i.append(chosen)
    return torch.stack(out_w), torch.tensor(out_i)


@pytest.mark.parametrize("score_func,groups,bias", [("sigmoid", 4, True), ("softmax", 1, False), ("softmax", 2, False)])
def test_gate_matches_hand_computed_routing(score_func, groups, bias):
    gate = _gate(score_func, groups, bias)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
    weights, indices = gate(x)
    hand_w, hand_i = _hand_route(gate, x)
    assert torch.equal(indices.sort(-1)[0], hand_i.sort(-1)[0])
    order = indices.argsort(-1)
    assert torch.allclose(weights.gather(1, order).float(), hand_w.gather(1, hand_i.argsort(-1)).float(), rtol=1e-2)


def _tiny_model(world: Parallel = Parallel(), seed: int = 0) -> Transformer:
    model = Transformer(TINY, world)
    state = random_full_state(TINY, seed)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_moe_output_is_the_per_token_sum_over_chosen_experts_plus_shared():
    moe = _tiny_model().layers[1].ffn
    assert isinstance(moe, MoE)
    x = torch.randn(12, TINY.dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = moe(x)
    weights, indices = moe.gate(x)
    for t in range(12):
        expected = moe.shared_experts(x[t:t + 1])[0].float()
        for k in range(TINY.n_activated_experts):
            expected += (moe.experts[int(indices[t, k])](x[t:t + 1])[0] * weights[t, k]).float()
        assert torch.allclose(y[t].float(), expected, atol=3e-2, rtol=3e-2)


def test_block_forward_matches_float64_recomputation():
    model = _tiny_model()
    block = model.layers[0]  # dense layer: attention + MLP
    x = torch.randn(2, 16, TINY.dim, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = block(x, model.freqs_cis[:16]).double()

    def lin(layer, v):
        return v @ layer.dequantized_weight().double().T

    def rms(norm, v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    a, h = TINY, x.double()
    att = block.attn
    hn = rms(block.attn_norm, h)
    q = lin(att.wq_b, rms(att.q_norm, lin(att.wq_a, hn))).view(2, 16, a.n_heads, a.qk_head_dim)
    kv = lin(att.wkv_a, hn)
    kv_c, k_pe = kv[..., :a.kv_lora_rank], kv[..., a.kv_lora_rank:]
    freqs = model.freqs_cis[:16].to(torch.complex128)

    def rope(v):
        c = torch.view_as_complex(v.reshape(*v.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(c * freqs.view(1, 16, 1, -1)).flatten(3)

    q = torch.cat([q[..., :a.qk_nope_head_dim], rope(q[..., a.qk_nope_head_dim:])], -1)
    k_pe = rope(k_pe.unsqueeze(2))
    kvb = lin(att.wkv_b, rms(att.kv_norm, kv_c)).view(2, 16, a.n_heads, -1)
    k = torch.cat([kvb[..., :a.qk_nope_head_dim], k_pe.expand(-1, -1, a.n_heads, -1)], -1)
    v = kvb[..., a.qk_nope_head_dim:]
    scores = torch.einsum("bshd,bthd->bhst", q, k) * att.softmax_scale
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    o = torch.einsum("bhst,bthd->bshd", scores, v).flatten(2)
    h = h + lin(att.wo, o)
    hn = rms(block.ffn_norm, h)
    mlp = block.ffn
    h = h + lin(mlp.w2, F.silu(lin(mlp.w1, hn)) * lin(mlp.w3, hn))
    rel = (got - h).norm() / h.norm()
    assert rel < 2e-2, rel


def test_checkpoint_round_trip_names_dtypes_shapes(tmp_path):
    state = random_full_state(TINY, 7)
    write_shards(state, TINY, tmp_path, 2)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    for rank in range(2):
        model = Transformer(TINY, Parallel(rank, 2, None))
        load_shard(model, tmp_path, rank, 2)
        sd = model.state_dict()
        assert sd[f"layers.1.ffn.experts.{8 * rank}.w2.weight"].dtype == torch.float8_e4m3fn
        assert sd[f"layers.1.ffn.experts.{8 * rank}.w2.scale"].dtype == torch.float32
        assert f"layers.1.ffn.experts.{8 * (1 - rank)}.w1.weight" not in sd
        assert sd["layers.0.attn.wq_b.weight"].shape == (TINY.n_heads * TINY.qk_head_dim // 2, TINY.q_lora_rank)
        assert sd["layers.0.attn.wo.weight"].shape == (TINY.dim, TINY.n_heads * TINY.v_head_dim // 2)
        assert sd["embed.weight"].dtype == torch.bfloat16 and sd["embed.weight"].shape[0] == TINY.vocab_size // 2
        half = TINY.n_heads * TINY.qk_head_dim // 2
        assert torch.equal(sd["layers.0.attn.wq_b.weight"].view(torch.uint8),
                           state["layers.0.attn.wq_b.weight"][rank * half:(rank + 1) * half].view(torch.uint8))
    assert (tmp_path / shard_name(1, 2)).exists()


def test_without_q_lora_the_model_runs():
    args = ModelArgs.from_dict({**TINY.to_dict(), "q_lora_rank": 0})
    model = Transformer(args)
    model.load_state_dict(random_full_state(args, 0))
    out = model(torch.randint(0, 256, (1, 8)))
    assert out.shape == (1, 8, 256) and torch.isfinite(out).all()


@pytest.mark.parametrize("max_seq_len", [2048, 4096, 8192])
def test_attention_is_the_one_the_exported_config_declares_whatever_max_seq_len(max_seq_len):
    """Rotary frequencies and softmax scale do not depend on max_seq_len (either side of original_seq_len=4096):
    they are YaRN's from the factors config.json declares, which engines run (the scale as transformers' DeepSeek
    attention derives it: qk_head_dim^-0.5 x (0.1 x mscale_all_dim x ln(factor) + 1)^2)."""
    import dataclasses
    import math

    from deepseek_ptq.hf.names import hf_config
    from deepseek_ptq.model.attention import MLA, precompute_freqs_cis, softmax_scale

    args, longest = dataclasses.replace(TINY, max_seq_len=max_seq_len), dataclasses.replace(TINY, max_seq_len=16384)
    assert torch.equal(precompute_freqs_cis(args), precompute_freqs_cis(longest)[:max_seq_len])
    config = hf_config(args)
    rope = config["rope_scaling"]
    assert (rope["type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 40, 4096)
    declared = (config["qk_nope_head_dim"] + config["qk_rope_head_dim"]) ** -0.5 * \
        (0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1) ** 2
    with torch.device("meta"):
        assert MLA(args, Parallel(), fp8=False).softmax_scale == softmax_scale(longest) == pytest.approx(declared, rel=1e-12)
    # Plain RoPE declared as none: a config without rotary scaling runs none.
    plain = dataclasses.replace(TINY, max_seq_len=max_seq_len, rope_factor=1.0)
    assert hf_config(plain)["rope_scaling"] is None
    assert softmax_scale(plain) == TINY.qk_head_dim ** -0.5
