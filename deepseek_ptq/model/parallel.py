"""Model-parallel building blocks, written for any world size W.

Every rank sees every token. Column-parallel layers split the output dim, row-parallel layers split the
input dim and all-reduce the partial sums, the vocabulary is split for the embedding and the head, and
routed experts live whole on one rank. With W = 1 every collective is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deepseek_ptq.model.kernels import BLOCK, dequant

LinearKind = Literal["replicated", "expert", "column", "row"]


@dataclass(frozen=True)
class Parallel:
    """Where this rank sits: passed to every layer instead of module-level globals."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, size: int, what: str) -> int:
        if size % self.world_size:
            raise ValueError(f"{what}={size} does not divide by world size {self.world_size}")
        return size // self.world_size


class Linear(nn.Module):
    """A linear layer whose weight is bf16, or float8_e4m3fn with a float32 128x128 block ``scale``."""

    kind: LinearKind = "replicated"

    def __init__(self, in_features: int, out_features: int, fp8: bool, par: Parallel,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.par = in_features, out_features, par
        self.compute_dtype = dtype
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype), requires_grad=False)
        if fp8:
            shape = (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
            self.scale = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("scale", None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        """The real weight in the compute dtype (FP8 codes times their block scales)."""
        if self.scale is None:
            return self.weight
        return dequant(self.weight, self.scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


class ExpertLinear(Linear):
    """A routed expert's linear: whole on one rank, never merged with another expert's statistics."""

    kind: LinearKind = "expert"


class ColumnParallelLinear(Linear):
    kind: LinearKind = "column"

    def __init__(self, in_features: int, out_features: int, fp8: bool, par: Parallel, **kw) -> None:
        super().__init__(in_features, par.split(out_features, "out_features"), fp8, par, **kw)


class RowParallelLinear(Linear):
    kind: LinearKind = "row"

    def __init__(self, in_features: int, out_features: int, fp8: bool, par: Parallel, **kw) -> None:
        super().__init__(par.split(in_features, "in_features"), out_features, fp8, par, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.dequantized_weight())
        self.par.all_reduce(y)
        return y if self.bias is None else y + self.bias


class ParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across ranks; each rank embeds its own ids, then a sum."""

    def __init__(self, vocab_size: int, dim: int, par: Parallel, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.par = par
        part = par.split(vocab_size, "vocab_size")
        self.start, self.end = par.rank * part, (par.rank + 1) * part
        self.weight = nn.Parameter(torch.empty(part, dim, dtype=dtype), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.par.world_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.start) | (tokens >= self.end)
        y = F.embedding((tokens - self.start).masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return self.par.all_reduce(y)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)
