"""DeepSeek-V3.2's lightning indexer against independent float64 recomputations; V3.2 attention against V3's;
the same selections on every rank.

The recomputation is written from DeepSeek-V3.2-Exp's description (FACTS.md), not from model/indexer.py: the
Hadamard matrix by Sylvester's construction, FP8 e4m3 rounding on its value grid (round half to even), power-of-two
scales by log2, rotary by explicit cos/sin on dims (i, i + r/2), in float64, with bf16 rounding where DeepSeek holds
bf16 tensors (projections, norm, rotary, Hadamard).
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.attention import MLA
from deepseek_ptq.model.indexer import Indexer, fp8_block_quant, hadamard, keep_top_keys, pow2_ceil
from deepseek_ptq.model.load import PACKAGED, build_model, ensure_generated_checkpoint
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.model.transformer import Transformer
from deepseek_ptq.pipeline.launch import free_port

TINY_V32 = ModelArgs.from_json(PACKAGED / "tiny_v32.json")
CPU = torch.device("cpu")


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) to the nearest float8 e4m3fn value, ties to even: 3 mantissa bits,
    exponents from -6 (below: the subnormal step 2^-9)."""
    a = v.abs()
    exponent = torch.floor(torch.log2(a.clamp_min(2.0 ** -30))).clamp_min(-6)
    step = 2.0 ** (exponent - 3)
    return torch.sign(v) * torch.round(a / step) * step


def bf(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def reference_quant(x: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Dequantized FP8 128-block activations (DeepSeek's act_quant), float64."""
    blocks = x.double().unflatten(-1, (-1, 128))
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448
    if pow2:
        scale = 2.0 ** torch.ceil(torch.log2(scale))
    return (e4m3((blocks / scale).clamp(-448, 448)) * scale).flatten(-2)


def reference_rotary_halves(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [b, s, h, r] float64, angles [s, r/2]: dims i and i + r/2 rotate together."""
    half = x.size(-1) // 2
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def reference_scores(ix: Indexer, x: torch.Tensor, qr: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    d, h, r = ix.head_dim, ix.n_heads, ix.rope_dim
    wq, wk = (m.dequantized_weight().double() for m in (ix.wq_b, ix.wk))
    q = bf(qr.double() @ wq.T).unflatten(-1, (h, d))
    k = bf(x.double() @ wk.T)
    k = bf((k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + 1e-6)
           * ix.k_norm.weight.double() + ix.k_norm.bias.double()).unsqueeze(2)
    rotation = sylvester(d) / math.sqrt(d)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t = torch.cat([bf(reference_rotary_halves(t[..., :r], angles)), t[..., r:]], dim=-1)
        return reference_quant(bf(t @ rotation.T), pow2=True)

    q, k = rotate(q), rotate(k).squeeze(2)
    weights = x.double() @ ix.weights_proj.weight.double().T * h ** -0.5 * d ** -0.5
    return torch.einsum("bsh,bsht->bst", weights, torch.einsum("bshd,btd->bsht", q, k).clamp_min(0))


def test_hadamard_is_sylvesters_scaled_by_root_n():
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    expected = x.double() @ sylvester(128).T / math.sqrt(128)
    assert torch.allclose(hadamard(x).double(), expected, rtol=0, atol=1e-5)
    xb = x.bfloat16()  # DeepSeek's bf16 in, bf16 out
    assert torch.equal(hadamard(xb), (xb.double() @ sylvester(128).T / math.sqrt(128)).bfloat16())
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)  # orthogonal and symmetric: its own inverse


def test_fp8_block_quant_rounds_to_the_e4m3_grid_with_power_of_two_scales():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 256, generator=gen) * torch.logspace(-3, 2, 256)  # many binades in a block
    x[0, 0, :128] = 0  # an empty block: the 1e-4 amax floor
    codes, scale = fp8_block_quant(x, pow2_scales=True)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (4, 6, 2)
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))  # powers of two
    deq = (codes.double().unflatten(-1, (-1, 128)) * scale.double().unsqueeze(-1)).flatten(-2)
    assert torch.equal(deq, reference_quant(x, pow2=True))
    assert torch.equal(pow2_ceil(torch.tensor([0.25, 0.3, 1.0, 1.0001, 3.0])), torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0]))
    _, plain = fp8_block_quant(x, pow2_scales=False)
    assert torch.allclose(plain.double(), x.abs().unflatten(-1, (-1, 128)).amax(-1).clamp_min(1e-4).double() / 448,
                          rtol=1e-7)


@pytest.fixture(scope="module")
def tiny_v32_layer() -> tuple[MLA, torch.Tensor, torch.Tensor]:
    """Layer 1's attention of a seeded tiny_v32 (FP8 weights), and its normed input on 2 x 48 tokens."""
    model = Transformer(TINY_V32)
    init_random_(model, 0)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    h = model.embed(tokens)
    freqs = model.freqs_cis[:48]
    h = model.layers[0](h, freqs)
    return model.layers[1].attn, model.layers[1].attn_norm(h), freqs


def test_indexer_scores_and_top_keys_against_float64(tiny_v32_layer):
    attn, x, freqs = tiny_v32_layer
    ix = attn.indexer
    qr = attn.q_norm(attn.wq_a(x))
    got = ix.scores(x, qr, freqs)
    want = reference_scores(ix, x, qr, torch.angle(freqs.to(torch.complex128)))
    scale = want.abs().amax()
    assert (got.double() - want).abs().max() < 1e-5 * scale, float((got.double() - want).abs().max() / scale)
    keep = ix(x, qr, freqs)
    seqlen = x.size(1)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    assert (keep.sum(-1) == torch.clamp(torch.arange(1, seqlen + 1), max=ix.topk)).all()  # top-k of the causal keys
    assert not (keep & ~causal).any()
    # Each query kept its best keys by the float64 scores, up to the tolerance above (measured: 2e-7 of the
    # largest score; an interleaved rotary is 0.7 off, linear scales or no Hadamard 0.03).
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    worst_kept = torch.where(keep, want, inf).amin(-1)
    best_dropped = torch.where(~keep & causal, want, -inf).amax(-1)
    assert (worst_kept >= best_dropped - 1e-5 * scale).all()
    assert (keep.sum(-1) < causal.sum(-1)).any()  # the sparse case is exercised (48 > index_topk 32)


def test_keep_top_keys_by_hand():
    scores = torch.tensor([[[5.0, 9, 9, 9], [1, 2, 9, 9], [3, 1, 2, 9], [0, 4, 3, 1]]])
    keep = keep_top_keys(scores, 2)
    assert keep.int().tolist() == [[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]]]


def test_v32_attention_equals_v3_when_every_key_is_kept(tiny_v32_layer):
    attn, x, freqs = tiny_v32_layer
    args = ModelArgs.from_dict({**TINY_V32.to_dict(), "index_topk": x.size(1)})
    dense = MLA(args, Parallel(), fp8=True)
    v3 = MLA(ModelArgs.from_dict({k: v for k, v in args.to_dict().items() if not k.startswith("index_")}),
             Parallel(), fp8=True)
    assert v3.indexer is None
    dense.load_state_dict(attn.state_dict())
    v3.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("indexer.")})
    assert torch.equal(dense(x, freqs), v3(x, freqs))
    assert not torch.equal(attn(x, freqs), v3(x, freqs))  # top-32 of 48 keys: a different attention


def test_indexer_config_is_checked():
    with pytest.raises(UserError, match="index_head_dim=96"):
        ModelArgs.from_dict({**TINY_V32.to_dict(), "index_head_dim": 96})
    with pytest.raises(UserError, match="q_lora_rank=0"):
        ModelArgs.from_dict({**TINY_V32.to_dict(), "q_lora_rank": 0})
    assert "index_n_heads" not in ModelArgs.from_json(PACKAGED / "tiny.json").to_dict()  # V3 configs unchanged


# ---------------------------------------------------------------------------------------------- ranks


def record_selections(rank: int, world_size: int, init_method: str, ckpt: str, out: str) -> None:
    """Every layer's indexer inputs and kept keys on this rank's shard of tiny_v32, for two batches."""
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=init_method,
                                timeout=datetime.timedelta(seconds=120))
    try:
        par = Parallel(rank, world_size, dist.group.WORLD if world_size > 1 else None)
        model = build_model(TINY_V32, Path(ckpt), par, CPU, progress=False)
        calls: list[dict] = []
        for i, layer in enumerate(model.layers):
            layer.attn.indexer.register_forward_hook(
                lambda m, inputs, kept, i=i: calls.append({"layer": i, "inputs": inputs, "kept": kept}))
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _ in range(2):
                model(torch.randint(0, 256, (2, 64), generator=gen))
        torch.save(calls, Path(out) / f"rank{rank}-mp{world_size}.pt")
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def test_every_rank_selects_the_same_keys_at_w1_and_w2(tmp_path, cache_dir):
    ckpts = {w: ensure_generated_checkpoint(TINY_V32, 0, w, cache_dir) for w in (1, 2)}
    record_selections(0, 1, "", str(ckpts[1]), str(tmp_path))
    mp.start_processes(record_selections, args=(2, f"tcp://127.0.0.1:{free_port()}", str(ckpts[2]), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    w1, r0, r1 = (torch.load(tmp_path / name) for name in ("rank0-mp1.pt", "rank0-mp2.pt", "rank1-mp2.pt"))
    assert len(w1) == len(r0) == len(r1) == 2 * TINY_V32.n_layers
    # The ranks of one run: the same inputs and weights (replicated), so the same keys, in every layer.
    for a, b in zip(r0, r1):
        assert all(torch.equal(x, y) for x, y in zip(a["inputs"], b["inputs"])) and torch.equal(a["kept"], b["kept"])
    # W = 1 and W = 2: the same keys where a layer's inputs are the same (layer 0: the embedding is exact at any W);
    # deeper, the hidden states differ by the bf16 rounding of row-parallel sums, yet W = 1's indexer given W = 2's
    # inputs selects exactly W = 2's keys: the selection depends on the inputs alone, not on W or the rank.
    assert [torch.equal(a["kept"], b["kept"]) for a, b in zip(w1, r0) if a["layer"] == 0] == [True, True]
    model = build_model(TINY_V32, ckpts[1], Parallel(), CPU, progress=False)
    with torch.no_grad():
        for call in r0:
            assert torch.equal(model.layers[call["layer"]].attn.indexer(*call["inputs"]), call["kept"]), call["layer"]
