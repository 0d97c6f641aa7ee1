"""From the ``quant`` config group to a modelopt quantization config, with DeepSeek's own rules:
gate, embedding and head never quantized; attention projections off unless ``quant.attn`` is set;
``wo`` quantized for FP4 formats unless ``quant.wo=false``; DeepSeek-V3.2's indexer (``attn.indexer``) off unless
``quant.indexer=fp8`` (its ``weights_proj`` is no Linear: never quantized). Rules are appended, so they win over the
preset (in modelopt's config the last matching entry wins)."""

from __future__ import annotations

import copy
from typing import Any

from deepseek_ptq.common import choice
from deepseek_ptq.errors import UserError
from deepseek_ptq.model import indexer

_FP8_PER_TENSOR = {"num_bits": (4, 3), "axis": None}
_NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}, "axis": None}
# Attention projections that NVFP4 attention quantizes (wkv_b feeds the attention scores and stays high precision).
_NVFP4_ATTN = ("wq", "wq_a", "wq_b", "wkv_a", "wo")


def known_presets() -> list[str]:
    import modelopt.torch.quantization as mtq

    return sorted(n for n in dir(mtq) if n.endswith("_CFG") and isinstance(getattr(mtq, n), dict)
                  and "quant_cfg" in getattr(mtq, n))


def load_preset(name: str) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    if name not in known_presets():
        raise UserError(f"unknown modelopt preset quant.preset={name!r}",
                        fix=f"use one of: {', '.join(known_presets())}")
    return copy.deepcopy(getattr(mtq, name))


def _entry_cfg(cfg: dict[str, Any], pattern: str) -> Any:
    """The preset's cfg for a quantizer pattern (the last entry naming it)."""
    found = None
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == pattern and "cfg" in entry:
            found = entry["cfg"]
    return found


def is_fp4(preset: str) -> bool:
    return "FP4" in preset.upper()


def build_quant_config(quant_cfg: Any, on_cpu: bool) -> dict[str, Any]:
    """The modelopt config for this run's quant group."""
    cfg = load_preset(quant_cfg.preset)
    rules: list[dict[str, Any]] = [
        {"quantizer_name": "*ffn.gate.*", "enable": False},
        {"quantizer_name": "*embed*", "enable": False},
        {"quantizer_name": "*head*", "enable": False},
        {"quantizer_name": "*attn.*", "enable": False},
    ]
    attn = choice(quant_cfg.attn)
    if attn == "fp8":
        rules += [{"quantizer_name": f"*attn.*{q}_quantizer", "cfg": dict(_FP8_PER_TENSOR)} for q in ("weight", "input")]
    elif attn == "nvfp4":
        rules += [{"quantizer_name": f"*attn.{m}.{q}_quantizer", "cfg": copy.deepcopy(_NVFP4)}
                  for m in _NVFP4_ATTN for q in ("weight", "input")]
    wo_on = quant_cfg.wo if quant_cfg.wo is not None else (is_fp4(quant_cfg.preset) or attn is not None)
    if wo_on and attn is None:
        for q in ("weight", "input"):
            preset_q = _entry_cfg(cfg, f"*{q}_quantizer")
            if preset_q is not None:
                rules.append({"quantizer_name": f"*attn.wo.{q}_quantizer", "cfg": copy.deepcopy(preset_q)})
    elif not wo_on:
        rules.append({"quantizer_name": "*attn.wo.*", "enable": False})
    # Last, so that no attention rule above reaches the indexer: its selection stays the unquantized model's.
    rules.append({"quantizer_name": "*attn.indexer.*", "enable": False})
    if choice(quant_cfg.get("indexer")) == "fp8":
        rules += [{"quantizer_name": f"*attn.indexer.{m}.{q}_quantizer", "cfg": dict(_FP8_PER_TENSOR)}
                  for m in indexer.QUANTIZABLE for q in ("weight", "input")]
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + rules
    if quant_cfg.algorithm is not None:
        cfg["algorithm"] = quant_cfg.algorithm
    algorithm = cfg["algorithm"]
    if algorithm == "max" or (isinstance(algorithm, dict) and algorithm.get("method") == "max"):
        # Cross-rank amax sync is ours: one batched collective in the fixup instead of one per quantizer.
        cfg["algorithm"] = {**(algorithm if isinstance(algorithm, dict) else {}), "method": "max", "distributed_sync": False}
    if on_cpu:
        from deepseek_ptq.quant import nvfp4_cpu, nvfp4_static_cpu

        nvfp4_static_cpu.register()  # static block scales (MSE, local Hessian, 4/6 weights): no backend hook
        cfg = nvfp4_cpu.use_cpu_backend(cfg)
    return cfg


def algorithm_method(cfg: dict[str, Any]) -> str:
    algorithm = cfg["algorithm"]
    return algorithm if isinstance(algorithm, str) else algorithm.get("method", "max")


def hf_algo_name(preset: str) -> str:
    """The quant_algo name serving engines read in hf_quant_config.json."""
    upper = preset.upper()
    for key, name in (("W4A8_AWQ", "W4A8_AWQ"), ("INT4_AWQ", "W4A16_AWQ"), ("NVFP4_AWQ", "NVFP4_AWQ"),
                      ("NVFP4", "NVFP4"), ("FP8", "FP8"), ("INT8", "W8A8_SQ_PER_CHANNEL"), ("MXFP4", "MXFP4")):
        if key in upper:
            return name
    return preset.removesuffix("_CFG")
