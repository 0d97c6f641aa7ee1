"""The DeepSeek-V3 transformer: embedding, blocks of MLA + (dense MLP | MoE), final norm, vocab-parallel head."""

from __future__ import annotations

import torch
from torch import nn

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.attention import MLA, precompute_freqs_cis
from deepseek_ptq.model.moe import MLP, MoE
from deepseek_ptq.model.parallel import ColumnParallelLinear, Parallel, ParallelEmbedding, RMSNorm


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, par: Parallel, fp8: bool) -> None:
        super().__init__()
        self.attn = MLA(args, par, fp8)
        self.ffn = MLP(args.dim, args.inter_dim, par, fp8) if layer_id < args.n_dense_layers else MoE(args, par, fp8)
        self.attn_norm = RMSNorm(args.dim)
        self.ffn_norm = RMSNorm(args.dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), freqs_cis)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, par: Parallel | None = None) -> None:
        super().__init__()
        par = par or Parallel()
        args.check_world_size(par.world_size)
        self.args, self.par = args, par
        fp8 = args.dtype == "fp8"
        self.embed = ParallelEmbedding(args.vocab_size, args.dim, par)
        self.layers = nn.ModuleList([Block(i, args, par, fp8) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim)
        # The head stays in high precision and is never quantized.
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, False, par)
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.ffn) for i, layer in enumerate(self.layers) if isinstance(layer.ffn, MoE)]

    def forward(self, tokens: torch.Tensor, logits: bool = True) -> torch.Tensor:
        """Hidden states of every position, or their full-vocabulary logits (float32)."""
        seqlen = tokens.size(1)
        if seqlen > self.args.max_seq_len:
            raise ValueError(f"sequence length {seqlen} exceeds max_seq_len {self.args.max_seq_len}")
        h = self.embed(tokens)
        freqs_cis = self.freqs_cis[:seqlen]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        h = self.norm(h)
        if not logits:
            return h
        return self.par.all_gather_last_dim(self.head(h).float())
