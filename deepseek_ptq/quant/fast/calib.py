"""The fast calibration path: on by default wherever it computes exactly what the plain path computes.

``with fast_calibration(model, all_experts, options) as fc: <forward passes>; fc.flush()``: while the block
runs, every MoE layer's ``routed`` is ``FastMoE`` (grouped GEMMs, per-expert amax by segment max:
quant/fast/moe.py) and the other quantized linears run a forward that uses a dequantized weight kept on the
device and skips their weight quantizer, which has nothing left to observe (modelopt's weight-only pass saw
every weight before the first batch; a running max of the same tensor again changes nothing). Both are bound
onto the instances for the block only: leaving it gives the model back exactly as it was (the model classes
carry no calibration state). ``flush`` puts the statistics into modelopt's calibrators, which then finish as usual.

It stands aside (the plain path runs) where it would not be exact: an algorithm other than max (AWQ and the
like patch module forwards), or a quantizer that changes its input or keeps anything but a running max during
calibration (pre-quant scale, rotation, bias calibration, a non-max calibrator, a sequential quantizer), or an
expert input quantizer whose amax is not one per tensor. ``calib.fast=false`` forces the plain path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.calib import MaxCalibrator
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from deepseek_ptq.quant.binding import Bindings
from deepseek_ptq.quant.fast.moe import FastMoE, stacked_bytes
from deepseek_ptq.quant.fast.options import FastOptions
from deepseek_ptq.quant.fast.running_max import RunningMax, merge_into_calibrators
from deepseek_ptq.quant.modules import quantized_linears

if TYPE_CHECKING:
    from deepseek_ptq.quant.fast.expert_weights import ExpertWeights

log = logging.getLogger(__name__)


def collects(q: TensorQuantizer) -> bool:
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
    if collects(q):
        if not isinstance(q._calibrator, MaxCalibrator) or type(q._calibrator) is not MaxCalibrator:
            return f"calibrator {type(q._calibrator).__name__}"
        if q.bias_calibrator is not None:
            return "bias calibration"
    return None


def per_tensor(q: TensorQuantizer) -> bool:
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
        if module.kind == "expert" and collects(q) and not per_tensor(q):
            return f"{name}: expert input amax is not per tensor (axis={q.axis}, block_sizes={q.block_sizes})"
    return None


def free_bytes(device: torch.device, reserve: int) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] - reserve
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 0


def _calibration_forward(module, weight: torch.Tensor | None, input_max: RunningMax | None):
    """A quantized linear's forward while the fast path runs (its weight quantizer has seen the weight)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = weight if weight is not None else module.dequantized_weight()
        if input_max is not None:
            input_max.update(x)  # no host sync per call: merged into the calibrator by ``flush``
        else:
            x = module.input_quantizer(x)  # per-channel or static blocks: its own call collects
        return module.finish(F.linear(x, w))
    return forward


class FastCalibration:
    """The fast path bound onto a quantized model for one pass over the calibration data (see module doc).

    Construct it through ``fast_calibration``, which also takes it off again."""

    def __init__(self, model: nn.Module, all_experts: bool, options: FastOptions | None = None,
                 stacked: dict[int, ExpertWeights] | None = None, experts_ratio: float | None = None) -> None:
        options = options or FastOptions()
        self.model = model
        self.bindings = Bindings()
        self.budget = free_bytes(next(model.parameters()).device, options.reserve_bytes)
        self._observe_weights_once()
        self.input_max: list[tuple[str, nn.Module, RunningMax]] = []
        linears = [(n, m) for n, m in quantized_linears(model) if m.kind != "expert"]
        for name, module in linears:
            weight = None
            if module.scale is not None and self._take(module.weight.numel() * 2):
                weight = module.dequantized_weight()
            q = module.input_quantizer
            input_max = None
            if not collects(q) or per_tensor(q):
                input_max = RunningMax(module.weight.device)
                self.input_max.append((f"{name}.input_quantizer", module, input_max))
            self.bindings.bind(module, "forward", _calibration_forward(module, weight, input_max))
        self.moes: list[FastMoE] = []
        stacked = stacked or {}
        for i, moe in model.moe_layers():
            if i in stacked:  # dequantized already (quant/fast/expert_weights.py): kept, whatever the budget
                keep = True
            else:
                keep = options.keep_weights if options.keep_weights is not None else self._take(stacked_bytes(moe))
            fast = FastMoE(moe, all_experts, keep_weights=keep, options=options, name=f"layers.{i}.ffn",
                           weights=(stacked[i].w13, stacked[i].w2) if i in stacked else None,
                           experts_ratio=experts_ratio)
            self.bindings.bind(moe, "routed", fast)
            self.moes.append(fast)
        log.info("fast calibration path: %d MoE layers (%d keep dequantized experts), %d other linears",
                 len(self.moes), sum(f.keep_weights for f in self.moes), len(linears))

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
            if collects(q) and q._calibrator.compute_amax() is None:
                q(module.dequantized_weight())

    def flush(self) -> None:
        """Merge the statistics into modelopt's calibrators (once, after the last batch).

        Raises quant.nonfinite.NonFiniteActivations naming the first quantizer whose statistic is not finite."""
        for fast in self.moes:
            fast.flush()
        seen = [entry for entry in self.input_max if entry[2].dtype is not None]
        for dtype in {r.dtype for _, _, r in seen}:
            group = [entry for entry in seen if entry[2].dtype == dtype]
            merge_into_calibrators([[m.input_quantizer] for _, m, _ in group],
                                   torch.stack([r.value for _, _, r in group]), dtype, [n for n, _, _ in group])

    def stop(self) -> None:
        """Take everything off: the model runs its plain path again (evaluation, export, a NaN hunt)."""
        for fast in self.moes:
            fast.release()
        self.bindings.restore()


@contextlib.contextmanager
def fast_calibration(model: nn.Module, all_experts: bool, options: FastOptions | None = None,
                     stacked: dict[int, ExpertWeights] | None = None,
                     experts_ratio: float | None = None) -> Iterator[FastCalibration]:
    """The fast path on ``model`` for the block (check ``why_not`` first); the model is restored on leaving.

    ``all_experts``: every local expert's quantizers also see every token (the layer output stays top-k's);
    ``experts_ratio``: each token's statistics experts only (quant/forced_routing.py).
    Call ``flush()`` after the last batch, inside the block, to hand the statistics to modelopt. ``stacked``:
    MoE layers whose experts are dequantized already (quant/fast/expert_weights.py)."""
    fc = FastCalibration(model, all_experts, options, stacked, experts_ratio)
    try:
        yield fc
    finally:
        fc.stop()


def in_use(model: nn.Module) -> bool:
    """Whether the fast path is bound onto ``model`` now."""
    return any(isinstance(m.__dict__.get("routed"), FastMoE) for m in model.modules())
