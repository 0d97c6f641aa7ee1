"""DeepSeek <-> Hugging Face: tensor names and the model config, shared by export and conversion.

DeepSeek's converted format drops the ``model.`` prefix and renames modules (FACTS, "Files"); the Hugging Face
DeepSeek-V3 layout is what serving engines (TensorRT-LLM, vLLM, SGLang) and ``transformers`` load.
"""

from __future__ import annotations

import re
from typing import Any

from deepseek_ptq.errors import UserError
from deepseek_ptq.model import indexer
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.attention import uses_yarn

# Module-name components, DeepSeek -> Hugging Face (one path component each, never a substring).
_MODULES = {
    "attn": "self_attn", "ffn": "mlp", "embed": "embed_tokens", "head": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}
_MODULES_BACK = {hf: ds for ds, hf in _MODULES.items()}
# Parameter names (the last component) that differ: FP8 block scales and the gate's selection bias.
_PARAMS = {"scale": "weight_scale_inv", "bias": "e_score_correction_bias"}
_PARAMS_BACK = {hf: ds for ds, hf in _PARAMS.items()}
# Path components both namings share (besides layer and expert indices).
_SHARED_COMPONENTS = frozenset({"layers", "experts", "shared_experts", "gate", "norm"})
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

LINEAR_MODULES = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3", "head"})
# DeepSeek-V3.2: ``attn.indexer.{wq_b,wk,k_norm,weights_proj}`` keep their names in the Hugging Face layout
# (``self_attn.indexer.wq_b``), so no rename applies inside the indexer.
_INDEXER = "indexer"


def _rename(parts: list[str], table: dict[str, str]) -> list[str]:
    return [p if i and parts[i - 1] == _INDEXER else table.get(p, p) for i, p in enumerate(parts)]


def is_indexer(ds_module: str) -> bool:
    """A module of the V3.2 indexer (``layers.3.attn.indexer.wk``)."""
    return f".{_INDEXER}." in ds_module


def is_linear(ds_module: str) -> bool:
    """A Linear that a quant config may quantize (the indexer's weights_proj is none)."""
    last = ds_module.rsplit(".", 1)[-1]
    return last in indexer.QUANTIZABLE if is_indexer(ds_module) else last in LINEAR_MODULES


def hf_module(ds_module: str) -> str:
    """``layers.1.ffn.experts.3.w1`` -> ``model.layers.1.mlp.experts.3.gate_proj``; ``head`` -> ``lm_head``."""
    parts = _rename(ds_module.split("."), _MODULES)
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def to_hf(ds_key: str) -> str:
    """A DeepSeek state-dict key as the Hugging Face checkpoint names it."""
    module, param = ds_key.rsplit(".", 1)
    # The gate's bias is the selection bias; every other ".bias" would keep its name (DeepSeek has none).
    if param == "bias" and not module.endswith(".gate"):
        return f"{hf_module(module)}.bias"
    return f"{hf_module(module)}.{_PARAMS.get(param, param)}"


def from_hf(hf_key: str) -> str | None:
    """A Hugging Face key in DeepSeek's naming, or None if this model has no such tensor."""
    if hf_key.startswith("model."):
        body = hf_key[len("model."):]
    elif hf_key.startswith("lm_head."):
        body = hf_key
    else:
        return None
    module, param = body.rsplit(".", 1)
    parts = module.split(".")
    in_indexer = [i > 0 and parts[i - 1] == _INDEXER for i in range(len(parts))]
    if any(not (p in indexer.MODULES if inside else (p in _MODULES_BACK or p in _SHARED_COMPONENTS or p.isdigit()
                                                     or (p == _INDEXER and parts[i - 1] == "self_attn")))
           for i, (p, inside) in enumerate(zip(parts, in_indexer))):
        return None
    k_norm_bias = param == "bias" and module.endswith(f"{_INDEXER}.k_norm")  # a LayerNorm's bias keeps its name
    if param not in _PARAMS_BACK and param != "weight" and not k_norm_bias:
        return None
    ds_module = ".".join(_rename(parts, _MODULES_BACK))
    return f"{ds_module}.{param if k_norm_bias else _PARAMS_BACK.get(param, param)}"


def kv_cache_scale_names(layer: int) -> tuple[str, str]:
    """Where an FP8 MLA KV-cache scale goes, as modelopt's Hugging Face export names it (``k_bmm_quantizer`` ->
    ``self_attn.k_proj.k_scale``, ``v_bmm_quantizer`` -> ``self_attn.v_proj.v_scale``) and NVIDIA's NVFP4
    DeepSeek checkpoints ship it: vLLM's ``maybe_remap_kv_scale_name`` maps the pair to the MLA attention's
    ``k_scale``/``v_scale``, SGLang's DeepSeek loader to ``self_attn.attn_mqa.k_scale``/``v_scale`` (README,
    "The FP8 KV cache")."""
    return (f"model.layers.{layer}.self_attn.k_proj.k_scale", f"model.layers.{layer}.self_attn.v_proj.v_scale")


def hf_layer_index(hf_key: str) -> int | None:
    """The decoder layer a Hugging Face key belongs to (None for embedding, final norm, head)."""
    match = _LAYER.match(hf_key)
    return int(match.group(1)) if match else None


def _topk_method(args: ModelArgs) -> str:
    # V3/R1: sigmoid scores with the selection bias ("noaux_tc"); V2: group-limited or plain greedy top-k.
    if args.gate_bias:
        return "noaux_tc"
    return "group_limited_greedy" if args.n_expert_groups > 1 else "greedy"


def architecture(args: ModelArgs) -> tuple[str, str]:
    """(architecture, model_type) loaders build for these ModelArgs: the V2 family routes with softmax scores (V2,
    V2-Lite, V2.5), V3 with sigmoid scores and the selection bias; loaders pick the router by this name (the V3
    classes route with sigmoid whatever ``scoring_func`` says)."""
    if args.score_func == "softmax":
        return "DeepseekV2ForCausalLM", "deepseek_v2"
    if args.has_indexer:
        return "DeepseekV32ForCausalLM", "deepseek_v32"
    return "DeepseekV3ForCausalLM", "deepseek_v3"


def hf_config(args: ModelArgs) -> dict[str, Any]:
    """config.json of a Hugging Face DeepSeek-V2/V3 (or V3.2, with the indexer) checkpoint for these ModelArgs (the
    MTP layer is not exported)."""
    name, model_type = architecture(args)
    yarn = uses_yarn(args)
    v32 = {"index_n_heads": args.index_n_heads, "index_head_dim": args.index_head_dim, "index_topk": args.index_topk}
    return {
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "num_nextn_predict_layers": 0,
        "first_k_dense_replace": args.n_dense_layers,
        "moe_layer_freq": 1,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "topk_method": _topk_method(args),
        "scoring_func": args.score_func,
        # DeepSeek's inference code renormalises the chosen weights only for sigmoid scores.
        "norm_topk_prob": args.score_func == "sigmoid",
        "routed_scaling_factor": args.route_scale,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": args.rope_theta,
        # The rotary the model ran (model.attention.uses_yarn), whatever max_seq_len was.
        "max_position_embeddings": int(args.original_seq_len * args.rope_factor) if yarn else args.original_seq_len,
        "rope_scaling": {"type": "yarn", "factor": args.rope_factor,
                         "original_max_position_embeddings": args.original_seq_len,
                         "beta_fast": args.beta_fast, "beta_slow": args.beta_slow,
                         "mscale": args.mscale, "mscale_all_dim": args.mscale} if yarn else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **(v32 if args.has_indexer else {}),
        # The indexer's activation scales (ue8m0: powers of two); the released checkpoints say it in their FP8
        # quantization_config, which a quantized export replaces.
        **({"scale_fmt": args.scale_fmt} if args.scale_fmt else {}),
    }


def args_from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs (DeepSeek's field names) from a Hugging Face DeepSeek-V2/V3/V3.2 config.json."""
    try:
        rope = hf.get("rope_scaling") or {}
        quant = hf.get("quantization_config") or {}
        values: dict[str, Any] = {
            "vocab_size": hf["vocab_size"], "dim": hf["hidden_size"], "inter_dim": hf["intermediate_size"],
            "moe_inter_dim": hf["moe_intermediate_size"], "n_layers": hf["num_hidden_layers"],
            "n_dense_layers": hf.get("first_k_dense_replace", 0), "n_heads": hf["num_attention_heads"],
            "n_routed_experts": hf["n_routed_experts"], "n_shared_experts": hf["n_shared_experts"],
            "n_activated_experts": hf["num_experts_per_tok"], "n_expert_groups": hf.get("n_group") or 1,
            "n_limited_groups": hf.get("topk_group") or 1, "score_func": hf.get("scoring_func", "softmax"),
            "route_scale": hf.get("routed_scaling_factor", 1.0), "gate_bias": hf.get("topk_method") == "noaux_tc",
            "q_lora_rank": hf.get("q_lora_rank") or 0, "kv_lora_rank": hf["kv_lora_rank"],
            "qk_nope_head_dim": hf["qk_nope_head_dim"], "qk_rope_head_dim": hf["qk_rope_head_dim"],
            "v_head_dim": hf["v_head_dim"], "rope_theta": hf.get("rope_theta", 10000.0),
            "dtype": "fp8" if quant.get("quant_method") == "fp8" else "bf16",
        }
    except KeyError as err:
        raise UserError(f"{source} lacks {err.args[0]!r}, which a DeepSeek-V3 config has",
                        fix="point at the config.json of a Hugging Face DeepSeek-V3/R1 checkpoint") from err
    if hf.get("index_n_heads"):  # DeepSeek-V3.2: the lightning indexer
        values.update(index_n_heads=hf["index_n_heads"], index_head_dim=hf.get("index_head_dim", 128),
                      index_topk=hf.get("index_topk", 2048))
    if hf.get("scale_fmt") or quant.get("scale_fmt"):
        values["scale_fmt"] = hf.get("scale_fmt") or quant["scale_fmt"]
    if not rope:  # no rotary scaling declared: plain RoPE (ModelArgs' default factor is DeepSeek-V3's 40)
        values["rope_factor"] = 1.0
    else:
        values.update(rope_factor=rope.get("factor", 40), original_seq_len=rope.get("original_max_position_embeddings", 4096),
                      beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
                      mscale=rope.get("mscale_all_dim", rope.get("mscale", 1.0)))
    return ModelArgs.from_dict(values, source=source)
