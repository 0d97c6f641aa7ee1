"""The amax fixup after calibration, as one batched collective entered by every rank.

1. Weight amax: any enabled weight quantizer still without amax gets it from its own dequantized weight.
2. One all-reduce(MAX) of a single vector whose layout comes from the model's structure alone (never from
   what a rank happens to hold, so no rank can skip it or disagree on its size) carrying:
   - the per-tensor amax of every tensor-parallel shard, so all shards of a layer share one amax;
   - with ``sync``, each MoE layer's max input amax over its local experts for w1, w2 and w3.
   A rank with nothing for a slot contributes -1 (amax is never negative); a slot that stays -1 was
   calibrated by no rank and is left without amax, and reported.
3. With ``sync``, every expert's input amax becomes its layer's max (the peer-max of the reference flow).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.moe import MoE
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.quant.modules import quantized_linears

EXPERT_LINEARS = ("w1", "w2", "w3")
_NONE = -1.0


@dataclass
class FixupReport:
    synced_input_amax: int = 0
    filled_weight_amax: int = 0
    tp_synced_amax: int = 0
    layers_without_expert_input_amax: list[str] = field(default_factory=list)
    collectives: int = 0
    seconds: float = 0.0
    # quantizer path -> how the fixup set its amax: weight_fill, tp_max or peer_max
    sources: dict[str, str] = field(default_factory=dict)


def leaf_quantizers(q: TensorQuantizer) -> list[TensorQuantizer]:
    return list(q) if isinstance(q, SequentialQuantizer) else [q]


def has_amax(q: TensorQuantizer) -> bool:
    return getattr(q, "_amax", None) is not None


def is_scalar_amax(q: TensorQuantizer) -> bool:
    """Per-tensor amax by config: no axis, and no static blocks (NVFP4's dynamic blocks keep a global scalar)."""
    blocks = q.block_sizes or {}
    return q.axis is None and (not blocks or blocks.get("type") == "dynamic")


@torch.no_grad()
def fill_weight_amax(model: torch.nn.Module) -> list[TensorQuantizer]:
    """Calibrate, from the dequantized weight, every enabled weight quantizer that has no amax."""
    filled = []
    for _, module in quantized_linears(model):
        for q in leaf_quantizers(module.weight_quantizer):
            if q.is_enabled and not has_amax(q):
                amax_from_weight(q, module)
                filled.append(q)
    return filled


def amax_from_weight(q: TensorQuantizer, module: torch.nn.Module) -> None:
    """Calibrate the weight quantizer ``q`` of ``module`` on its dequantized weight (max calibration, one pass)."""
    q.disable_quant()
    q.enable_calib()
    q(module.dequantized_weight())
    q.load_calib_amax()
    q.enable_quant()
    q.disable_calib()


def _tp_slots(model: torch.nn.Module, par: Parallel) -> list[tuple[TensorQuantizer, int]]:
    if par.world_size == 1:
        return []
    slots = []
    for _, module in quantized_linears(model):
        if module.kind not in ("column", "row"):
            continue
        for q in leaf_quantizers(module.input_quantizer) + leaf_quantizers(module.weight_quantizer):
            if q.is_enabled and is_scalar_amax(q):
                slots.append((q, 1))
    return slots


def _expert_input_quantizers(moe: MoE, linear: str) -> list[TensorQuantizer]:
    return [getattr(expert, linear).input_quantizer for _, expert in moe.local_experts()]


@torch.no_grad()
def fixup(model, par: Parallel, sync_experts: bool, device: torch.device) -> FixupReport:
    start = time.perf_counter()
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    report = FixupReport()
    for q in fill_weight_amax(model):
        report.sources[names[id(q)]] = "weight_fill"
    report.filled_weight_amax = len(report.sources)
    tp = _tp_slots(model, par)
    moes = model.moe_layers() if sync_experts else []
    for layer, moe in moes:
        for linear in EXPERT_LINEARS:
            q = getattr(moe.experts[moe.experts_start], linear).input_quantizer
            if q.is_enabled and not is_scalar_amax(q):
                raise UserError(f"layers.{layer}.ffn.experts.*.{linear}: peer-max sync needs a per-tensor input amax, "
                                f"this format has axis={q.axis} block_sizes={q.block_sizes}",
                                fix="set calib.sync=false for this quant format")
    values = [q.amax.float().reshape(-1) if has_amax(q) else torch.full((n,), _NONE, device=device) for q, n in tp]
    for _, moe in moes:
        for linear in EXPERT_LINEARS:
            amaxes = [q.amax.float().reshape(()) for q in _expert_input_quantizers(moe, linear) if q.is_enabled and has_amax(q)]
            values.append(torch.stack(amaxes).amax().reshape(1) if amaxes else torch.full((1,), _NONE, device=device))
    if values:
        vector = torch.cat([v.to(device) for v in values])
        if par.world_size > 1:
            dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=par.group)
            report.collectives += 1
        reduced = iter(vector.tolist())
        for q, _ in tp:
            value = next(reduced)
            if value != _NONE:
                q.amax = torch.tensor(value, dtype=torch.float32, device=device)
                report.tp_synced_amax += 1
                report.sources.setdefault(names[id(q)], "tp_max")
        for layer, moe in moes:
            for linear in EXPERT_LINEARS:
                value = next(reduced)
                quantizers = [q for q in _expert_input_quantizers(moe, linear) if q.is_enabled]
                if not quantizers:
                    continue
                if value == _NONE:
                    report.layers_without_expert_input_amax.append(f"layers.{layer}.ffn.experts.*.{linear}")
                    continue
                for q in quantizers:
                    q.amax = torch.tensor(value, dtype=torch.float32, device=device)
                    report.sources[names[id(q)]] = "peer_max"
                report.synced_input_amax += len(quantizers)
    report.seconds = time.perf_counter() - start
    return report


def missing_amax(model: torch.nn.Module) -> list[str]:
    """Enabled quantizers of this rank left without amax (dynamic formats need none and are skipped)."""
    missing = []
    for name, module in quantized_linears(model):
        for kind in ("input_quantizer", "weight_quantizer"):
            for i, q in enumerate(leaf_quantizers(getattr(module, kind))):
                if q.is_enabled and not has_amax(q) and not _is_dynamic_per_tensor_free(q):
                    missing.append(f"{name}.{kind}" + (f".{i}" if isinstance(getattr(module, kind), SequentialQuantizer) else ""))
    return missing


def _is_dynamic_per_tensor_free(q: TensorQuantizer) -> bool:
    """Quantizers that compute their scale from each input (no calibrated amax needed)."""
    return bool(getattr(q, "_dynamic", False))
