"""Feed-forward layers: the dense MLP, the routing Gate, routed experts and the MoE layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.parallel import ColumnParallelLinear, ExpertLinear, Parallel, RowParallelLinear


class MLP(nn.Module):
    """Dense feed-forward (and the shared experts): tensor-parallel w1/w3 columns, w2 rows."""

    def __init__(self, dim: int, inter_dim: int, par: Parallel, fp8: bool) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim, fp8, par)
        self.w2 = RowParallelLinear(inter_dim, dim, fp8, par)
        self.w3 = ColumnParallelLinear(dim, inter_dim, fp8, par)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Expert(nn.Module):
    """One routed expert, whole on the rank that holds it."""

    def __init__(self, dim: int, inter_dim: int, par: Parallel, fp8: bool) -> None:
        super().__init__()
        self.w1 = ExpertLinear(dim, inter_dim, fp8, par)
        self.w2 = ExpertLinear(inter_dim, dim, fp8, par)
        self.w3 = ExpertLinear(dim, inter_dim, fp8, par)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Top-k routing with optional selection bias and group-limited selection (replicated on every rank)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale = args.score_func, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=torch.bfloat16), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
                     if args.gate_bias else None)

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(scores, selection scores (score + bias), dropped groups [tokens, groups] or None, top-k indices)."""
        scores = F.linear(x, self.weight)
        scores = scores.softmax(dim=-1, dtype=torch.float32) if self.score_func == "softmax" else scores.sigmoid()
        selection = scores if self.bias is None else scores + self.bias  # the bias steers selection only
        limited, dropped = selection, None
        if self.n_groups > 1:
            grouped = selection.view(x.size(0), self.n_groups, -1)
            group_scores = grouped.amax(dim=-1) if self.bias is None else grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            limited = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        return scores, selection, dropped, limited.topk(self.topk, dim=-1)[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, _, _, indices = self._select(x)
        weights = scores.gather(1, indices)  # the unbiased scores
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), indices

    def ranked(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The first ``max(k, topk)`` experts of each token [tokens, max(k, topk)] in the gate's order of preference:
        its top-k (exactly as ``forward`` picks them, in its order), then the other experts of the groups it kept,
        then those of the groups it dropped, each tier by selection score (score + bias; ties: lower index first).
        So ``k <= topk`` gives the top-k and ``k = n_routed_experts`` every expert (partial forced routing)."""
        _, selection, dropped, indices = self._select(x)
        if k <= self.topk:
            return indices
        n_experts = selection.shape[-1]
        tier = torch.ones_like(selection, dtype=torch.int8)  # 0: top-k, 1: a kept group, 2: a dropped group
        if dropped is not None:
            tier += dropped.to(torch.int8).repeat_interleave(n_experts // self.n_groups, dim=1)
        tier.scatter_(1, indices, 0)
        # Two stable sorts, by score and then by tier, order the experts by (tier, score); tier 0 is the top-k.
        by_score = selection.sort(dim=-1, descending=True, stable=True)[1]
        by_tier = by_score.gather(1, tier.gather(1, by_score).sort(dim=-1, stable=True)[1])
        return torch.cat([indices, by_tier[:, self.topk:k]], dim=1)


class MoE(nn.Module):
    """Routed experts (this rank's slice) plus shared experts."""

    def __init__(self, args: ModelArgs, par: Parallel, fp8: bool) -> None:
        super().__init__()
        self.n_routed_experts = args.n_routed_experts
        per_rank = par.split(args.n_routed_experts, "n_routed_experts")
        self.experts_start, self.experts_end = par.rank * per_rank, (par.rank + 1) * per_rank
        self.par = par
        self.gate = Gate(args)
        self.experts = nn.ModuleList([
            Expert(args.dim, args.moe_inter_dim, par, fp8) if self.experts_start <= i < self.experts_end else None
            for i in range(args.n_routed_experts)
        ])
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, par, fp8)
        # Routed-token counts of every expert (the gate is replicated, so every rank knows all of them).
        self.register_buffer("token_counts", torch.zeros(args.n_routed_experts, dtype=torch.int64), persistent=False)

    def local_experts(self) -> list[tuple[int, Expert]]:
        return [(i, self.experts[i]) for i in range(self.experts_start, self.experts_end)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        # A scatter-add, not bincount: bincount waits for the device to size its output.
        flat = indices.flatten()
        counts = torch.zeros_like(self.token_counts).scatter_add_(0, flat, torch.ones_like(flat))
        self.token_counts += counts
        y = self.routed(x, weights, indices, counts)
        z = self.shared_experts(x)
        self.par.all_reduce(y)
        return (y + z).view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               counts: torch.Tensor) -> torch.Tensor:
        """This rank's part of the routed experts' output (before the all-reduce): one call per local expert."""
        y = torch.zeros_like(x)
        local_counts = counts[self.experts_start:self.experts_end].tolist()
        for (i, expert), n in zip(self.local_experts(), local_counts):
            if n == 0:
                continue
            rows, slot = torch.where(indices == i)
            y.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return y
