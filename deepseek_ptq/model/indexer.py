"""DeepSeek-V3.2's lightning indexer: which keys each query attends to (DeepSeek Sparse Attention).

Per token, as in DeepSeek-V3.2-Exp's ``inference/model.py`` (the version of 2025-11-17):
q = wq_b(query latent after MLA's q_norm), index_n_heads heads of index_head_dim; k = k_norm(wk(x)), one head;
rotary embedding on the first qk_rope_head_dim dims of q and k, *non-interleaved* (dims i and i + r/2 form a
pair; MLA's rotary pairs neighbours); a Hadamard rotation scaled by d^-1/2; FP8 e4m3 quantization in 128-blocks
(power-of-two scales when scale_fmt is ue8m0); score(s, t) = sum over heads h of w[s, h] relu(q[s, h] . k[t])
with w = weights_proj(x) * index_n_heads^-1/2 * d^-1/2; causal; each query keeps its top index_topk keys.

Every part is replicated on every rank (nothing is split): x (the normed residual stream, the same on every rank
after each all-reduce) and the query latent (wq_a and q_norm are replicated) are the same on every rank, so the
same operations on the same values select the same keys everywhere, with no broadcast (DeepSeek broadcasts rank
0's selection and asserts that the ranks agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.kernels import BLOCK
from deepseek_ptq.model.parallel import Linear, Parallel

# The indexer's modules, named alike in DeepSeek's and Hugging Face's layouts, and those that may be quantized
# (quant.indexer=fp8); weights_proj never is.
MODULES = ("wq_b", "wk", "k_norm", "weights_proj")
QUANTIZABLE = ("wq_b", "wk")
FP8_MAX = 448.0
_MIN_AMAX = 1e-4  # DeepSeek's act_quant floor: an all-zero block gets a finite scale


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n^T * n^-1/2 over the last dim (n a power of two; H_n Sylvester's, natural order), computed in
    float32 by the fast Walsh-Hadamard butterfly, returned in x's dtype (DeepSeek's fast-hadamard-transform)."""
    n = x.size(-1)
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    y = x.float()
    h = 1
    while h < n:
        pairs = y.unflatten(-1, (n // (2 * h), 2, h))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * n ** -0.5).to(x.dtype)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 x) of positive normal floats, exactly (DeepSeek's ue8m0 scale rounding)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - (mantissa == 0.5).to(exponent.dtype))


def fp8_block_quant(x: torch.Tensor, pow2_scales: bool, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations -> (float8_e4m3fn codes, float32 scales of each ``block`` of the last dim): DeepSeek's act_quant."""
    blocks = x.float().unflatten(-1, (-1, block))
    scale = blocks.abs().amax(dim=-1).clamp_min(_MIN_AMAX) * (1.0 / FP8_MAX)
    if pow2_scales:
        scale = pow2_ceil(scale)
    codes = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.flatten(-2), scale


def fp8_block_dequant(codes: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    return (codes.float().unflatten(-1, (-1, block)) * scale.unsqueeze(-1)).flatten(-2)


def apply_rotary_halves(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, s, h, r] by the position's angles, pairing dim i with dim i + r/2 (non-interleaved)."""
    half = x.size(-1) // 2
    pairs = torch.complex(x[..., :half].float(), x[..., half:].float())
    rotated = pairs * freqs_cis.view(1, x.size(1), 1, -1)
    return torch.cat([rotated.real, rotated.imag], dim=-1).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in float32 (DeepSeek's indexer k_norm); stored in bf16."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.bfloat16), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), self.weight.float(), self.bias.float(), self.eps).type_as(x)


class HeadWeights(nn.Module):
    """``weights_proj``: per-head weights of the index score, stored in bf16, computed in float32. Deliberately
    not a ``Linear``: modelopt never converts it, so it is never quantized (as in every peer's recipe)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.in_features, self.out_features = dim, n_heads
        self.weight = nn.Parameter(torch.empty(n_heads, dim, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class Indexer(nn.Module):
    """The top ``index_topk`` causal keys of every query, as a boolean mask [batch, query, key]."""

    def __init__(self, args: ModelArgs, par: Parallel, fp8: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = args.index_n_heads, args.index_head_dim, args.qk_rope_head_dim
        self.topk = args.index_topk
        self.pow2_scales = args.scale_fmt is not None  # DeepSeek rounds scales to powers of two for any scale_fmt
        # Replicated Linears (kind "replicated"): no split, the same weights on every rank.
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, fp8, par)
        self.wk = Linear(args.dim, self.head_dim, fp8, par)
        self.k_norm = LayerNorm(self.head_dim)
        self.weights_proj = HeadWeights(args.dim, self.n_heads)

    def _rotate(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Rotary on the first rope dims, then the Hadamard rotation: x [b, s, h, d] -> bf16."""
        pe, nope = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return hadamard(torch.cat([apply_rotary_halves(pe, freqs_cis), nope], dim=-1))

    def scores(self, x: torch.Tensor, qr: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Index scores [b, s, t] (float32) of every query s against every key t (no mask)."""
        bsz, seqlen, _ = x.shape
        q = self._rotate(self.wq_b(qr).view(bsz, seqlen, self.n_heads, self.head_dim), freqs_cis)
        k = self._rotate(self.k_norm(self.wk(x)).unsqueeze(2), freqs_cis).squeeze(2)
        q = fp8_block_dequant(*fp8_block_quant(q, self.pow2_scales))
        k = fp8_block_dequant(*fp8_block_quant(k, self.pow2_scales))
        weights = self.weights_proj(x) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        logits = torch.einsum("bshd,btd->bsht", q, k).relu_()
        return torch.einsum("bsht,bsh->bst", logits, weights)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        return keep_top_keys(self.scores(x, qr, freqs_cis), self.topk)


def keep_top_keys(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Boolean [b, s, t]: the ``topk`` best-scored keys t <= s of each query s (all of them when s < topk)."""
    seqlen = scores.size(-1)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=scores.device).tril_()
    chosen = scores.masked_fill(~causal, float("-inf")).topk(min(topk, seqlen), dim=-1).indices
    # A query with fewer than topk earlier keys picks some masked ones too: the causal mask drops them.
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True) & causal
