"""The model in pieces for layer-streamed calibration: one block, or the two ends (embedding; final norm and
head), each under its resident module names (``layers.3.ffn.experts.7.w1``, ``head``), so that name-based
quantization rules, checkpoint keys, seeded weights and amax keys are exactly those of the whole model.

A piece computes what the whole model computes for its part: ``Transformer.forward`` is
``Ends.logits(blocks(Ends(tokens)))`` with the same operations in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.attention import precompute_freqs_cis
from deepseek_ptq.model.moe import MoE
from deepseek_ptq.model.parallel import ColumnParallelLinear, Parallel, ParallelEmbedding, RMSNorm
from deepseek_ptq.model.transformer import Block


class LayerPiece(nn.Module):
    """Block ``layer_id`` alone, run on hidden states."""

    def __init__(self, args: ModelArgs, layer_id: int, par: Parallel) -> None:
        super().__init__()
        self.args, self.par, self.layer_id = args, par, layer_id
        self.layers = nn.ModuleDict({str(layer_id): Block(layer_id, args, par, args.dtype == "fp8")})
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)

    @property
    def block(self) -> Block:
        return self.layers[str(self.layer_id)]

    def is_dense(self) -> bool:
        return self.layer_id < self.args.n_dense_layers

    def can_become(self, layer_id: int) -> bool:
        """Whether layer ``layer_id`` has this block's structure (both dense, or both MoE)."""
        return (layer_id < self.args.n_dense_layers) == self.is_dense()

    def renumber(self, layer_id: int) -> None:
        """This block's modules under layer ``layer_id``'s names (a block reused for the next layer; its
        parameters are refilled by the caller). Nothing in a block depends on its number but its names."""
        assert self.can_become(layer_id), (self.layer_id, layer_id)
        self.layers = nn.ModuleDict({str(layer_id): self.block})
        self.layer_id = layer_id

    def moe_layers(self) -> list[tuple[int, MoE]]:
        ffn = self.block.ffn
        return [(self.layer_id, ffn)] if isinstance(ffn, MoE) else []

    def forward(self, h: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """The block's output (``logits`` is accepted for the calibration loop's call and ignored)."""
        return self.block(h, self.freqs_cis[:h.size(1)])


class Ends(nn.Module):
    """The embedding (``forward``) and the final norm and head (``logits``)."""

    def __init__(self, args: ModelArgs, par: Parallel) -> None:
        super().__init__()
        self.args, self.par = args, par
        self.embed = ParallelEmbedding(args.vocab_size, args.dim, par)
        self.norm = RMSNorm(args.dim)
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, False, par)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return []

    def forward(self, tokens: torch.Tensor, logits: bool = False) -> torch.Tensor:
        if tokens.size(1) > self.args.max_seq_len:
            raise ValueError(f"sequence length {tokens.size(1)} exceeds max_seq_len {self.args.max_seq_len}")
        return self.embed(tokens)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (float32) of the last block's hidden states."""
        return self.par.all_gather_last_dim(self.head(self.norm(h)).float())
