"""Multi-head latent attention (MLA) with YaRN rotary embeddings, as in DeepSeek-V2/V3.

Calibration runs whole sequences at once, so there is no KV cache: keys and values are expanded per
head (DeepSeek's "naive" form), which also sends every projection through its own Linear so that each
one can be calibrated. DeepSeek-V3.2 adds the lightning indexer (model/indexer.py): each query then attends
to the top ``index_topk`` of its causal keys, passed to SDPA as a boolean mask.

What serving engines cache for each token is ``cache_entries``' pair, the normalized kv latent (``kv_lora_rank``
wide) and the rotary key (``qk_rope_head_dim``): an identity here, the FP8 KV cache's fake quantization once
modelopt converts the module (quant.modules.QuantMLA), so that every key and value attention reads comes from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.indexer import Indexer
from deepseek_ptq.model.parallel import ColumnParallelLinear, Linear, Parallel, RMSNorm, RowParallelLinear


def uses_yarn(args: ModelArgs) -> bool:
    """YaRN (interpolated frequencies, softmax mscale) whenever the config scales the rotary, whatever max_seq_len:
    the exported config.json declares it and engines always run it (DeepSeek's reference only past
    original_seq_len, so a shorter max_seq_len calibrated another attention than the one served)."""
    return args.rope_factor > 1


def precompute_freqs_cis(args: ModelArgs) -> torch.Tensor:
    """Complex rotations per position, with YaRN's frequency interpolation (``uses_yarn``)."""
    dim, base, factor = args.qk_rope_head_dim, args.rope_theta, args.rope_factor

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if uses_yarn(args):
        low = max(math.floor(correction_dim(args.beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of the last dim of x [b, s, h, d] by the position's angles."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * freqs_cis.view(1, x.size(1), 1, -1)).flatten(3)
    return rotated.to(x.dtype)


def softmax_scale(args: ModelArgs) -> float:
    scale = args.qk_head_dim ** -0.5
    if uses_yarn(args):
        mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
        scale *= mscale * mscale
    return scale


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, par: Parallel, fp8: bool) -> None:
        super().__init__()
        self.args = args
        self.n_local_heads = par.split(args.n_heads, "n_heads")
        heads = args.n_heads
        if args.q_lora_rank == 0:
            self.wq = ColumnParallelLinear(args.dim, heads * args.qk_head_dim, fp8, par)
        else:
            self.wq_a = Linear(args.dim, args.q_lora_rank, fp8, par)
            self.q_norm = RMSNorm(args.q_lora_rank)
            self.wq_b = ColumnParallelLinear(args.q_lora_rank, heads * args.qk_head_dim, fp8, par)
        self.wkv_a = Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, fp8, par)
        self.kv_norm = RMSNorm(args.kv_lora_rank)
        self.wkv_b = ColumnParallelLinear(args.kv_lora_rank, heads * (args.qk_nope_head_dim + args.v_head_dim), fp8, par)
        self.wo = RowParallelLinear(heads * args.v_head_dim, args.dim, fp8, par)
        self.softmax_scale = softmax_scale(args)
        self.indexer = Indexer(args, par, fp8) if args.has_indexer else None

    def cache_entries(self, kv_latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token's KV-cache entry as attention reads it back: the normalized latent and the rotary key."""
        return kv_latent, k_pe

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        a = self.args
        bsz, seqlen, _ = x.shape
        qr = None if a.q_lora_rank == 0 else self.q_norm(self.wq_a(x))
        q = self.wq(x) if qr is None else self.wq_b(qr)
        q = q.view(bsz, seqlen, self.n_local_heads, a.qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rotary_emb(q_pe, freqs_cis)], dim=-1)
        kv, k_pe = self.wkv_a(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        kv_latent, k_pe = self.cache_entries(self.kv_norm(kv), apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis))
        kv = self.wkv_b(kv_latent).view(bsz, seqlen, self.n_local_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_local_heads, -1)], dim=-1)
        # V3.2: the indexer's top keys of each query (a subset of its causal keys), the same for every head.
        keep = None if self.indexer is None else self.indexer(x, qr, freqs_cis).unsqueeze(1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=keep, is_causal=keep is None, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).flatten(2))
