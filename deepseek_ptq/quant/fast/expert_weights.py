"""A reused block's routed experts dequantized once, for the three things that read them.

Calibrating a 671B MoE layer reads its 768 expert weights three times: the check for NaN and inf, the weight
quantizers' max pass and the fast path's stacking (grouped GEMMs). Each dequantization is a kernel launch and
some Python, about 150 us on one H200: a third of a second per layer, three times over. When a streamed run
recalibrates a reused block (quant/reuse.py), the experts are stacked first, as the fast path uses them, and
each weight's max |w| is one reduction over the stack per projection. That max is what modelopt's max
calibrator of a per-tensor weight quantizer keeps (``max |w|`` in the weight's dtype: the same bits), and a
NaN or inf in a weight shows in it (the max propagates NaN), so the finite check reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from deepseek_ptq.model.moe import MoE
from deepseek_ptq.quant.fast.moe import stacked_bytes, stacked_expert_weights
from deepseek_ptq.quant.fast.options import FastOptions


@dataclass
class ExpertWeights:
    """One MoE layer's local experts: stacked (``FastMoE``'s w13 and w2) and each weight's max |w|."""

    w13: torch.Tensor
    w2: torch.Tensor
    linears: list[nn.Module]  # every expert's w1, then every w3, then every w2
    names: list[str]  # their module names
    amax: torch.Tensor  # float32 [3 x local experts], on the device: max |w| of each linear's weight

    @classmethod
    def of(cls, moe: MoE, name: str) -> ExpertWeights:
        w13, w2 = stacked_expert_weights(moe)
        inter = w2.shape[-1]
        experts = moe.local_experts()
        linears, names = [], []
        for proj in ("w1", "w3", "w2"):
            linears += [getattr(e, proj) for _, e in experts]
            names += [f"{name}.experts.{i}.{proj}" for i, _ in experts]

        def per_expert_max(w: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(w.flatten(1), float("inf"), dim=1).float()

        amax = torch.cat([per_expert_max(w13[:, :inter]), per_expert_max(w13[:, inter:]), per_expert_max(w2)])
        return cls(w13, w2, linears, names, amax)


def stack_experts(model: nn.Module, options: FastOptions | None = None) -> dict[int, ExpertWeights]:
    """MoE layer id -> its experts, for every MoE layer of ``model`` (a block: one at most); none where the
    fast path would not keep stacked experts (``options.keep_weights``, else the free memory decides)."""
    from deepseek_ptq.quant.fast.calib import free_bytes

    options = options or FastOptions()
    moes = model.moe_layers()
    if not moes or options.keep_weights is False:
        return {}
    if options.keep_weights is None:
        device = moes[0][1].token_counts.device
        if sum(stacked_bytes(moe) for _, moe in moes) > free_bytes(device, options.reserve_bytes):
            return {}
    return {i: ExpertWeights.of(moe, f"layers.{i}.ffn") for i, moe in moes}


def observe_stacked(stacked: dict[int, ExpertWeights]) -> set[int]:
    """Each stacked expert's max |w| into its weight quantizer's calibrator, as ``quantizer(weight)`` with
    statistics on would leave it (per-tensor max calibrators only); the ids of the linears so served."""
    from deepseek_ptq.quant.fast.calib import collects, per_tensor
    from deepseek_ptq.quant.fast.running_max import merge_into_calibrators

    served: set[int] = set()
    for experts in stacked.values():
        rows = [k for k, linear in enumerate(experts.linears)
                if type(linear.weight_quantizer) is TensorQuantizer and collects(linear.weight_quantizer)
                and per_tensor(linear.weight_quantizer)]
        if not rows:
            continue
        merge_into_calibrators([[experts.linears[k].weight_quantizer] for k in rows], experts.amax[rows],
                               experts.w13.dtype, [experts.names[k] for k in rows])
        served |= {id(experts.linears[k]) for k in rows}
    return served
