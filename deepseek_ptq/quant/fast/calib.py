"""The fast calibration path: on by default wherever it computes exactly what the plain path computes.

While modelopt's max calibration runs the forward passes, every MoE layer runs ``FastMoE`` (grouped GEMMs,
per-expert amax by segment max: quant/fast_moe.py) and the other quantized linears use a dequantized weight
kept on the device and skip their weight quantizer, which has nothing left to observe (modelopt's weight-only
pass saw every weight before the first batch; a running max of the same tensor again changes nothing).
At the end the expert statistics go into modelopt's calibrators, which then finish as usual.

It stands aside (the plain path runs) where it would not be exact: an algorithm other than max (AWQ and the
like patch module forwards), or a quantizer that changes its input or keeps anything but a running max during
calibration (pre-quant scale, rotation, bias calibration, a non-max calibrator, a sequential quantizer), or an
expert input quantizer whose amax is not one per tensor. ``calib.fast=false`` forces the plain path.
"""

from __future__ import annotations

import logging
import os

import torch
from modelopt.torch.quantization.calib import MaxCalibrator
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from deepseek_ptq.quant.fast.moe import FastMoE, stacked_bytes
from deepseek_ptq.quant.fast.running_max import RunningMax, merge_into_calibrators
from deepseek_ptq.quant.modules import quantized_linears

log = logging.getLogger(__name__)

# Device memory left free for activations when deciding what dequantized weights to keep.
RESERVE_BYTES = 12 << 30
# None: keep dequantized weights where they fit; tests set True/False to exercise both ways.
KEEP_WEIGHTS: bool | None = None


def _collects(q: TensorQuantizer) -> bool:
    return not q._disabled and q._if_calib and not q._dynamic


def _observes_only(q) -> str | None:
    """Why calling ``q`` during calibration does more than return its input and keep a running max (None: it doesn't)."""
    if type(q) is not TensorQuantizer:  # sequential or specialised quantizers: leave them to the plain path
        return f"{type(q).__name__} quantizer"
    if q.pre_quant_scale is not None or q.rotate_is_enabled or q.rotate_back_is_enabled:
        return "a quantizer transforms its input (pre-quant scale or rotation)"
    if q._disabled:
        return None
    if q._if_quant:
        return "a quantizer quantizes during calibration"
    if _collects(q):
        if not isinstance(q._calibrator, MaxCalibrator) or type(q._calibrator) is not MaxCalibrator:
            return f"calibrator {type(q._calibrator).__name__}"
        if q.bias_calibrator is not None:
            return "bias calibration"
    return None


def _per_tensor(q: TensorQuantizer) -> bool:
    blocks = q.block_sizes or {}
    return q.axis is None and (not blocks or blocks.get("type") == "dynamic")


def why_not(model: nn.Module, method: str) -> str | None:
    """Why the fast path would not reproduce the plain path's calibration here (None: it would)."""
    if method != "max":
        return f"algorithm {method!r}"
    for name, module in quantized_linears(model):
        for q in (module.input_quantizer, module.weight_quantizer):
            reason = _observes_only(q)
            if reason is not None:
                return f"{name}: {reason}"
        q = module.input_quantizer
        if module.kind == "expert" and _collects(q) and not _per_tensor(q):
            return f"{name}: expert input amax is not per tensor (axis={q.axis}, block_sizes={q.block_sizes})"
    return None


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] - RESERVE_BYTES
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 0


class FastCalibration:
    """Attach the fast path to a quantized model for one pass over the calibration data (see module doc)."""

    def __init__(self, model: nn.Module, all_experts: bool) -> None:
        self.model = model
        self.linears = [m for _, m in quantized_linears(model) if m.kind != "expert"]
        self.moes = [moe for _, moe in model.moe_layers()]
        self.budget = _free_bytes(next(model.parameters()).device)
        self._observe_weights_once()
        for module in self.linears:
            if module.scale is not None and self._take(module.weight.numel() * 2):
                module._calib_weight = module.dequantized_weight()
            module._weight_observed = True
            q = module.input_quantizer
            if not _collects(q) or _per_tensor(q):  # else its own call collects (per-channel or static blocks)
                module._input_max = RunningMax(module.weight.device)
        for moe in self.moes:
            keep = KEEP_WEIGHTS if KEEP_WEIGHTS is not None else self._take(stacked_bytes(moe))
            moe.fast_path = FastMoE(moe, all_experts, keep_weights=keep)
        kept = sum(moe.fast_path.keep_weights for moe in self.moes)
        log.info("fast calibration path: %d MoE layers (%d keep dequantized experts), %d other linears",
                 len(self.moes), kept, len(self.linears))

    def _take(self, nbytes: int) -> bool:
        if nbytes > self.budget:
            return False
        self.budget -= nbytes
        return True

    @torch.no_grad()
    def _observe_weights_once(self) -> None:
        """A weight quantizer that has not seen its weight yet sees it now, once (modelopt's pass usually did)."""
        for _, module in quantized_linears(self.model):
            q = module.weight_quantizer
            if _collects(q) and q._calibrator.compute_amax() is None:
                q(module.dequantized_weight())

    def flush(self) -> None:
        """Merge the expert statistics into modelopt's calibrators (once, after the last batch)."""
        for moe in self.moes:
            moe.fast_path.flush()
        seen = [m for m in self.linears if m._input_max is not None and m._input_max.dtype is not None]
        for dtype in {m._input_max.dtype for m in seen}:
            group = [m for m in seen if m._input_max.dtype == dtype]
            merge_into_calibrators([[m.input_quantizer] for m in group],
                                   torch.stack([m._input_max.value for m in group]), dtype)

    def stop(self) -> None:
        """Detach everything: the model runs its plain path again (evaluation, export, a NaN hunt)."""
        for moe in self.moes:
            if moe.fast_path is not None:
                moe.fast_path.release()
            moe.fast_path = None
        for module in self.linears:
            module._calib_weight = None
            module._weight_observed = False
            module._input_max = None
