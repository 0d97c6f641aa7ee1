"""Calibration: modelopt's quantize over the calibration batches in the chosen MoE mode."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.parallel import Linear

log = logging.getLogger(__name__)
# modelopt imports its Hugging Face export code lazily and warns that transformers is missing: this
# project exports nothing through it, so the warning only confuses.
warnings.filterwarnings("ignore", message="Cannot find transformers package")


@torch.no_grad()
def check_finite_weights(model: nn.Module) -> None:
    """NaN or inf in a weight is named here, not found later as a NaN amax deep inside modelopt."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            if not torch.isfinite(module.dequantized_weight()).all():
                bad.append(f"{name}.weight")
        elif name.endswith(("norm", "gate", "embed")):
            bad += [f"{name}.{p}" for p, t in module.named_parameters(recurse=False) if not torch.isfinite(t.float()).all()]
    if bad:
        raise UserError(f"non-finite values (NaN or inf) in {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}",
                        fix="the checkpoint is corrupt: re-convert or re-download these tensors")


@torch.no_grad()
def first_non_finite_module(model: nn.Module, tokens: torch.Tensor) -> str:
    """Re-run one batch with hooks to name the first module whose output is not finite."""
    found: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            if not found and isinstance(output, torch.Tensor) and output.is_floating_point() and not torch.isfinite(output).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(tokens, logits=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "(not reproducible)"


def _stop_statistics(model: nn.Module) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            module.disable_calib()


def set_all_experts_mode(model: nn.Module, on: bool) -> None:
    for _, moe in model.moe_layers():
        moe.route_all_tokens_for_stats = on


def reset_token_counts(model: nn.Module) -> None:
    for _, moe in model.moe_layers():
        moe.token_counts.zero_()


@torch.no_grad()
def materialize_dequantized_weights(model: nn.Module) -> None:
    """Replace FP8 codes by real weights: search-based algorithms (AWQ) read and rescale ``weight`` directly."""
    for _, module in model.named_modules():
        if isinstance(module, Linear) and module.scale is not None:
            module.weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)
            module.scale = None


def calibrate(model: nn.Module, mtq_cfg: dict[str, Any], batches: list[torch.Tensor], all_experts: bool,
              device: torch.device, progress: bool, on_batch: Callable[[int], None] | None = None,
              fast: bool = True) -> float:
    """Quantize the model in place with modelopt, calibrating on ``batches``; returns the seconds spent.

    ``fast``: the grouped-GEMM path of quant/fast_calib.py where the format allows it (same amax as the plain
    path, one modelopt call per expert, which ``fast=False`` forces).

    ``on_batch(i)`` runs after batch i has finished on the device (benchmarks time batches with it).
    """
    import modelopt.torch.quantization as mtq

    from deepseek_ptq.quant import modules
    from deepseek_ptq.quant.fast import calib as fast_calib
    from deepseek_ptq.quant.recipes import algorithm_method

    modules.register()
    check_finite_weights(model)
    if algorithm_method(mtq_cfg) != "max":
        log.info("algorithm %s reads weights directly: dequantizing FP8 weights in place", algorithm_method(mtq_cfg))
        materialize_dequantized_weights(model)

    def forward_loop(m: nn.Module) -> None:
        # Some algorithms (AWQ) run the loop more than once: the counts describe one pass over the data.
        reset_token_counts(m)
        set_all_experts_mode(m, all_experts)
        fast_path = None
        if fast:
            reason = fast_calib.why_not(m, algorithm_method(mtq_cfg))
            if reason is None:
                fast_path = fast_calib.FastCalibration(m, all_experts)
            else:
                log.info("plain calibration path: %s", reason)
        try:
            for i, tokens in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
                tokens = tokens.to(device)
                try:
                    finite = bool(torch.isfinite(m(tokens, logits=False)).all())
                except (RuntimeError, AssertionError) as err:
                    if "nan" not in str(err).lower():
                        raise
                    finite = False  # modelopt's calibrator refused a NaN amax: name the module below
                if not finite:
                    if fast_path is not None:
                        fast_path.stop()  # the hunt for the module runs the plain path, one call per expert
                    set_all_experts_mode(m, False)
                    _stop_statistics(m)
                    raise UserError(f"non-finite activations during calibration, first at {first_non_finite_module(m, tokens)}",
                                    fix="check the checkpoint and the compute dtype (model activations overflow)")
                if on_batch is not None:
                    on_batch(i)
            if fast_path is not None:
                fast_path.flush()
        finally:
            if fast_path is not None:
                fast_path.stop()
            set_all_experts_mode(m, False)

    start = time.perf_counter()
    mtq.quantize(model, mtq_cfg, forward_loop)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
