"""One converted block for every layer of its kind in a layer-streamed run.

modelopt's conversion of a 671B MoE block (1,552 quantizers: module replacement, then every rule matched
against every quantizer name) is seconds of Python per layer, the same work for each of 58 layers. A streamed
run converts the first block of a kind (dense, MoE) once and gives each later layer of that kind the same
modules: renamed to the layer, refilled with its weights, every quantizer's statistics cleared, then calibrated
again (``recalibrate``). tests/test_layerwise.py checks the amax, summaries and evaluation against the resident
run bit for bit.

It is sound only when the rules cannot tell the two layers apart by name and the calibration left nothing in a
quantizer but its statistics; ``why_not_reuse`` says when that is not so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepseek_ptq.model.pieces import LayerPiece

# A wildcard of "*" and literal text without digits matches layers.3.x exactly when it matches layers.13.x (no
# literal can overlap the layer number, "*" absorbs it): only the other rules need checking name by name.
_CHARS_THAT_MAY_TELL_LAYERS_APART = set("0123456789?[")


def why_not_reuse(block: LayerPiece, mtq_cfg: dict[str, Any], layer_id: int) -> str | None:
    """None when layer ``layer_id`` may take over ``block``'s converted and calibrated modules, else why not."""
    from modelopt.torch.quantization.config import normalize_quant_cfg_list
    from modelopt.torch.quantization.conversion import _match_quantizer  # modelopt's own rule matching (0.47)
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    if not block.can_become(layer_id):
        return f"layer {layer_id} is not of the kind of layer {block.layer_id} (dense or MoE)"
    quantizers = [(name, m) for name, m in block.named_modules() if isinstance(m, (TensorQuantizer, SequentialQuantizer))]
    for name, module in quantizers:
        if type(module) not in (TensorQuantizer, SequentialQuantizer):
            # static block quantizers are promoted to another class once calibrated
            return f"calibration turned {name} into a {type(module).__name__}"
    ours, theirs = f"layers.{block.layer_id}.", f"layers.{layer_id}."
    for entry in normalize_quant_cfg_list(mtq_cfg.get("quant_cfg", [])):
        rule = entry["quantizer_name"]
        if isinstance(rule, str) and not _CHARS_THAT_MAY_TELL_LAYERS_APART & set(rule):
            continue
        for name, module in quantizers:
            renamed = theirs + name.removeprefix(ours)
            if (_match_quantizer(rule, name, module, None, block)
                    != _match_quantizer(rule, renamed, module, None, block)):
                return f"the quantizer rule {rule!r} tells {name} from {renamed}"
    return None


def clear_statistics(block: nn.Module) -> None:
    """Every quantizer as a fresh conversion leaves it: no amax, no collected maximum, no bias."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in block.modules():
        if isinstance(module, TensorQuantizer):
            if hasattr(module, "_amax"):
                delattr(module, "_amax")
            if module._calibrator is not None:
                module._calibrator.reset()
            module.reset_bias()


def _plain_max(algorithm: Any) -> bool:
    """The algorithm recipes.build_quant_config makes for max: no option that ``recalibrate`` leaves out."""
    return isinstance(algorithm, dict) and algorithm == {"method": "max", "distributed_sync": False}


def recalibrate(block: nn.Module, algorithm: Any, forward_loop: Callable[[nn.Module], None],
                observe_weights: Callable[[], set[int]] | None = None) -> None:
    """Calibrate a block whose quantizers modelopt converted and calibrated before (for another layer).

    For plain max this is modelopt's max_calibrate (model_calib.py) without the steps that cannot apply here:
    statistics on, each weight once through its quantizer, the batches, statistics loaded. Its other steps
    serve what why_not_reuse refuses (static block scales and their shared global amax), the distributed sync
    that this project does in the fixup, and wrappers this model has none of (FSDP, offloaded weights); they
    cost over a second of module-tree walks per 671B layer. Any other algorithm goes through modelopt.

    ``observe_weights``: called once statistics are on; gives their weights to some weight quantizers itself
    (the stacked experts' max |w|) and returns the ids of the linears it served, which the weight pass skips."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

    from deepseek_ptq.quant.modules import quantized_linears

    clear_statistics(block)
    if not _plain_max(algorithm):
        mtq.calibrate(block, algorithm, forward_loop)
        return
    with torch.no_grad():
        enable_stats_collection(block)
        served = observe_weights() if observe_weights is not None else set()
        for _, linear in quantized_linears(block):
            if id(linear) in served:
                continue
            for weight, quantizer in linear.iter_weights_for_calibration():
                quantizer(weight)
        forward_loop(block)
        finish_stats_collection(block)
