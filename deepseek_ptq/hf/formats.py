"""Which real format each linear of a run exports to, from the run's quant group.

The modelopt config that calibration used (``quant.recipes.build_quant_config``) is replayed with modelopt's
own rules: entries in order, the last one matching a quantizer's name wins, an entry with ``cfg`` replaces
the attributes, one with only ``enable`` toggles. Only the formats serving engines load from a modelopt
NVFP4/FP8 checkpoint are exported; anything else is refused before any file is written. A linear the run left
unquantized on purpose in the checkpoint's stored FP8 blocks (``quant.overrides`` format ``fp8_block``) is
``FP8_BLOCK_SCALES``, TensorRT-LLM's name for DeepSeek's own FP8 format.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from deepseek_ptq.errors import UserError

NVFP4 = "NVFP4"
FP8 = "FP8"
FP8_BLOCK = "FP8_BLOCK_SCALES"
CALIBRATED = (NVFP4, FP8)  # the formats whose scales come from the run's amax (FP8_BLOCK keeps the stored ones)


@dataclass
class _QuantizerState:
    enabled: bool = True  # a fresh TensorQuantizer is enabled; every preset starts with "*": disabled
    cfg: Any = None


def _attr(cfg: Any, name: str) -> Any:
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def _format_of(cfg: Any) -> str | None:
    """NVFP4, FP8 (per tensor) or None (a format this exporter does not write)."""
    if cfg is None or isinstance(cfg, list):
        return None
    num_bits = _attr(cfg, "num_bits")
    num_bits = tuple(num_bits) if isinstance(num_bits, list) else num_bits
    blocks = _attr(cfg, "block_sizes")
    axis = _attr(cfg, "axis")
    if num_bits == (2, 1) and isinstance(blocks, dict) and blocks.get(-1) == 16 and \
            blocks.get("type", "static") in ("dynamic", "static") and _as_tuple(blocks.get("scale_bits")) == (4, 3):
        return NVFP4  # static: weights with calibrated block scales (MSE, local Hessian, four-over-six)
    if num_bits == (4, 3) and not blocks and axis is None:
        return FP8
    return None


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def static_weight_fp8_max(mtq_cfg: dict[str, Any], modules: list[str]) -> dict[str, float]:
    """Modules whose NVFP4 weight keeps static block scales -> the FP8 max those are normalized to (448; 256
    for four-over-six)."""
    from modelopt.torch.quantization.conversion import normalize_quant_cfg_list
    from modelopt.torch.quantization.utils.numeric_utils import E4M3_MAX, E4M3_MAX_46

    entries = normalize_quant_cfg_list(mtq_cfg["quant_cfg"])
    found: dict[str, float] = {}
    for module in modules:
        weight = _replay(entries, f"{module}.weight_quantizer")
        blocks = _attr(weight.cfg, "block_sizes")
        if weight.enabled and _format_of(weight.cfg) == NVFP4 and blocks.get("type", "static") == "static":
            found[module] = E4M3_MAX_46 if blocks.get("four_over_six") else E4M3_MAX
    return found


def _replay(entries: list[Any], quantizer: str) -> _QuantizerState:
    state = _QuantizerState()
    for entry in entries:
        if entry.get("parent_class"):
            continue  # class-restricted entries (BatchNorm, Embedding, ...) never match DeepSeek's linears
        if not fnmatch(quantizer, entry["quantizer_name"]):
            continue
        if entry["cfg"] is not None:
            state.cfg = entry["cfg"]
        state.enabled = bool(entry["enable"])
    return state


def module_formats(mtq_cfg: dict[str, Any], modules: list[str], preset: str,
                   stored_blocks: frozenset[str] = frozenset()) -> dict[str, str | None]:
    """Each linear's export format (None: left unquantized), refusing formats that have no export here.
    ``stored_blocks``: the linears left in the checkpoint's FP8 blocks (their quantizers are off)."""
    from modelopt.torch.quantization.conversion import normalize_quant_cfg_list

    entries = normalize_quant_cfg_list(mtq_cfg["quant_cfg"])
    formats: dict[str, str | None] = {}
    unsupported: list[str] = []
    for module in modules:
        weight = _replay(entries, f"{module}.weight_quantizer")
        act = _replay(entries, f"{module}.input_quantizer")
        if not weight.enabled and not act.enabled:
            formats[module] = FP8_BLOCK if module in stored_blocks else None
            continue
        fmt = _format_of(weight.cfg) if weight.enabled else None
        if fmt is None or not act.enabled or _format_of(act.cfg) != fmt:
            unsupported.append(module)
            continue
        formats[module] = fmt
    if unsupported:
        raise UserError(f"quant.preset={preset} quantizes {len(unsupported)} linears in a format this export does not "
                        f"write (first: {', '.join(unsupported[:3])}); it writes NVFP4 and FP8 per-tensor weights "
                        f"with static activation scales",
                        fix="export runs made with quant=nvfp4 or quant=fp8 (quant.attn=fp8|nvfp4 is fine)")
    return formats
