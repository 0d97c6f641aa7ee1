"""From the ``quant`` config group to a modelopt quantization config, with DeepSeek's own rules:
gate, embedding and head never quantized; attention projections off unless ``quant.attn`` is set;
``wo`` quantized for FP4 formats unless ``quant.wo=false``; DeepSeek-V3.2's indexer (``attn.indexer``) off unless
``quant.indexer=fp8`` (its ``weights_proj`` is no Linear: never quantized); the MLA KV cache (``attn.kv_bmm_quantizer``
on the normalized latent, ``attn.pe_bmm_quantizer`` on the rotary key: quant/modules.py) off unless
``quant.kv_cache=fp8``, then FP8 E4M3 per tensor with max calibration; then ``quant.overrides``, per-module
formats in order. Rules are appended, so they win over the preset (in modelopt's config the last matching entry
wins); the never-quantized rules come after the overrides, which therefore cannot reach them."""

from __future__ import annotations

import copy
from fnmatch import fnmatch
from typing import Any

from omegaconf import OmegaConf

from deepseek_ptq.common import choice
from deepseek_ptq.errors import UserError
from deepseek_ptq.model import indexer
from deepseek_ptq.model.args import ModelArgs

_FP8_PER_TENSOR = {"num_bits": (4, 3), "axis": None}
_NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}, "axis": None}
# Attention projections that NVFP4 attention quantizes (wkv_b feeds the attention scores and stays high precision).
_NVFP4_ATTN = ("wq", "wq_a", "wq_b", "wkv_a", "wo")
# The linears a quant.overrides entry may reach: every Linear but the head (never quantized) and the V3.2 indexer's
# (its own switch, quant.indexer); the router and the embedding are no such Linear.
_OVERRIDABLE = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"})
# Pairs engines run as one GEMM (README, "Engine constraints"): vLLM refuses a fused layer of two formats.
_FUSED = (("w1", "w3"), ("wq_a", "wkv_a"))
_W = ("w1", "w2", "w3")
# The formats of quant.overrides (pipeline/config.py OverrideFormat); fp8_block and none leave a linear unquantized.
OVERRIDE_FORMATS = ("nvfp4", "fp8", "fp8_block", "none")


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


def check_kv_cache(quant_cfg: Any) -> str | None:
    """The KV-cache format this runner calibrates (fp8) or None; UserError for one it does not."""
    kv = choice(quant_cfg.get("kv_cache"))
    if kv not in (None, "fp8"):
        raise UserError(f"quant.kv_cache={kv}: this runner calibrates an FP8 KV cache only (one per-tensor scale "
                        "for each layer's latent and rotary key, as engines cache them)",
                        fix="set quant.kv_cache=fp8, or leave it unset (KV cache unquantized)")
    return kv


def build_quant_config(quant_cfg: Any, on_cpu: bool) -> dict[str, Any]:
    """The modelopt config for this run's quant group."""
    kv_cache = check_kv_cache(quant_cfg)
    cfg = load_preset(quant_cfg.preset)
    rules: list[dict[str, Any]] = [{"quantizer_name": "*attn.*", "enable": False}]
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
    rules += override_rules(quant_cfg)
    # After the overrides, which never reach them: the router, embedding and head stay high precision.
    rules += [{"quantizer_name": q, "enable": False} for q in ("*ffn.gate.*", "*embed*", "*head*")]
    # Last, so that no attention rule above reaches the indexer: its selection stays the unquantized model's.
    rules.append({"quantizer_name": "*attn.indexer.*", "enable": False})
    if choice(quant_cfg.get("indexer")) == "fp8":
        rules += [{"quantizer_name": f"*attn.indexer.{m}.{q}_quantizer", "cfg": dict(_FP8_PER_TENSOR)}
                  for m in indexer.QUANTIZABLE for q in ("weight", "input")]
    if kv_cache == "fp8":  # after "*attn.*", which keeps the cache unquantized otherwise
        from deepseek_ptq.quant.modules import KV_CACHE_QUANTIZERS  # imports modelopt: only when asked

        rules += [{"quantizer_name": f"*attn.{q}", "cfg": dict(_FP8_PER_TENSOR)} for q in KV_CACHE_QUANTIZERS]
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


def _overrides(quant_cfg: Any) -> list[tuple[str, str]]:
    """(pattern, format) of each ``quant.overrides`` entry, in order."""
    entries = quant_cfg.get("overrides") or []
    return [(str(e["pattern"]), str(choice(e["format"]))) for e in entries]


def override_rules(quant_cfg: Any) -> list[dict[str, Any]]:
    """modelopt entries for ``quant.overrides``: each pattern names modules, so its quantizers are the pattern's
    ``weight_quantizer`` and ``input_quantizer``."""
    formats = {"nvfp4": _NVFP4, "fp8": _FP8_PER_TENSOR}
    rules: list[dict[str, Any]] = []
    for pattern, fmt in _overrides(quant_cfg):
        for q in ("weight", "input"):
            name = f"{pattern}.{q}_quantizer"
            rules.append({"quantizer_name": name, "cfg": copy.deepcopy(formats[fmt])} if fmt in formats
                         else {"quantizer_name": name, "enable": False})
    return rules


def overridable(module: str) -> bool:
    """Whether a ``quant.overrides`` pattern may reach this linear (DeepSeek's module names)."""
    return module.rsplit(".", 1)[-1] in _OVERRIDABLE and ".indexer." not in module


def override_format(quant_cfg: Any, module: str) -> str | None:
    """The format the last ``quant.overrides`` entry matching ``module`` gives it (None: no entry matches)."""
    if not overridable(module):
        return None
    found = None
    for pattern, fmt in _overrides(quant_cfg):
        if fnmatch(module, pattern):
            found = fmt
    return found


def stored_block_modules(quant_cfg: Any, modules: list[str]) -> set[str]:
    """The linears the run leaves in the checkpoint's stored FP8 blocks (``format: fp8_block``)."""
    return {m for m in modules if override_format(quant_cfg, m) == "fp8_block"}


def model_linears(args: ModelArgs) -> list[str]:
    """The linears ``quant.overrides`` may reach in a model of these arguments, in DeepSeek's names."""
    attn = (["wq"] if not args.q_lora_rank else ["wq_a", "wq_b"]) + ["wkv_a", "wkv_b", "wo"]
    names: list[str] = []
    for i in range(args.n_layers):
        names += [f"layers.{i}.attn.{m}" for m in attn]
        if i < args.n_dense_layers:
            names += [f"layers.{i}.ffn.{w}" for w in _W]
            continue
        names += [f"layers.{i}.ffn.experts.{e}.{w}" for e in range(args.n_routed_experts) for w in _W]
        if args.n_shared_experts:
            names += [f"layers.{i}.ffn.shared_experts.{w}" for w in _W]
    return names


def _described(fmt: str | None) -> str:
    return f"format {fmt}" if fmt else "no override (the recipe's own format)"


def _missing(entry: Any, key: str) -> bool:
    return OmegaConf.is_missing(entry, key) if OmegaConf.is_config(entry) else entry.get(key) is None


def check_overrides(quant_cfg: Any, args: ModelArgs) -> None:
    """Refuse ``quant.overrides`` that would not do what they say: an entry without pattern or format, a pattern that
    matches no linear of this model, stored FP8 blocks on a model that stores none, or a pair that engines run as
    one GEMM given two formats."""
    entries = quant_cfg.get("overrides") or []
    for i, entry in enumerate(entries):
        for key in ("pattern", "format"):
            if _missing(entry, key):
                raise UserError(f"quant.overrides[{i}] has no {key}",
                                fix=f"write each entry as {{pattern: \"*layers.0.*\", format: fp8}} (formats: "
                                    f"{', '.join(OVERRIDE_FORMATS)})")
    if not entries:
        return
    linears = model_linears(args)
    for i, (pattern, fmt) in enumerate(_overrides(quant_cfg)):
        if not any(fnmatch(m, pattern) for m in linears):
            raise UserError(f"quant.overrides[{i}].pattern={pattern!r} matches no linear of this model",
                            fix=f"match DeepSeek's module names, e.g. {linears[0]}, {linears[-1]} (head, router, "
                                f"embedding and the V3.2 indexer are never overridden)")
        if fmt == "fp8_block" and args.dtype != "fp8":
            raise UserError(f"quant.overrides[{i}] asks for the stored FP8 blocks (format: fp8_block), but this "
                            f"model's checkpoint is {args.dtype}", fix="use format: none (left unquantized) instead")
    present = set(linears)
    for m in linears:
        for a, b in _FUSED:
            if m.endswith("." + a):
                partner = m[: -len(a)] + b
                ours, theirs = override_format(quant_cfg, m), override_format(quant_cfg, partner)
                if partner in present and ours != theirs:
                    raise UserError(f"quant.overrides give {m} {_described(ours)} and {partner} {_described(theirs)}: "
                                    f"engines run the two as one GEMM, in one format",
                                    fix=f"give {a} and {b} the same format (a pattern such as "
                                        f"\"{m.rsplit('.', 1)[0]}.*\")")


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
