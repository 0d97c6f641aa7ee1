"""Partial forced routing (``calib.experts_ratio`` r): while calibrating, each token also reaches, for statistics
only, the first ceil(r x E) experts of its gate's ranking (model/moe.py ``Gate.ranked``: its top-k, then the
rest of the groups it kept, then the groups it dropped, by selection score); the layer output stays top-k's.
r = 1 is all-experts calibration; ceil(r x E) <= top-k is top-k calibration. The plain path
(quant/calibrate.py) and the fast path (quant/fast/moe.py) both take the experts from here."""

from __future__ import annotations

import math

import torch

from deepseek_ptq.model.moe import MoE


def statistics_experts(ratio: float, n_experts: int, topk: int) -> int:
    """Experts per token whose quantizers see it: max(top-k, ceil(ratio x n_experts)). The product is rounded to
    6 decimals before the ceiling: 0.07 x 100 is 7.000000000000001 in floating point, and means 7."""
    return max(topk, math.ceil(round(ratio * n_experts, 6)))


def forced_experts(moe: MoE, x: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """Each token's statistics experts beyond its top-k are counted into ``moe.token_counts`` (which so counts the
    tokens each expert's quantizers see) and returned with the top-k first: [tokens, k] over all E experts (every
    rank ranks the same, the gate is replicated). None where k is the top-k: the routed forward sees them all."""
    topk = moe.gate.topk
    k = statistics_experts(ratio, moe.n_routed_experts, topk)
    if k <= topk:
        return None
    forced = moe.gate.ranked(x, k)
    extra = forced[:, topk:].flatten()
    moe.token_counts.scatter_add_(0, extra, torch.ones_like(extra))
    return forced
