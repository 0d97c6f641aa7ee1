"""The scales serving engines share, applied to the calibrated model before it is evaluated or exported.

Engines run some pairs of linears as one GEMM over their concatenated weights, with one per-tensor weight scale
and one input scale for the pair (README, "Engine constraints"): gate/up (w1/w3) of every routed expert, shared
expert and dense MLP, and the attention's input projections wq_a/wkv_a (``fused_qkv_a_proj``). Given two scales,
vLLM and SGLang keep the max or the first one, TensorRT-LLM refuses or requantizes; so each pair gets the max of
its two amax here, in the run, and what the run evaluates is what an engine computes. The same holds for the MLA
KV cache: engines store each token's latent and rotary key as one FP8 row with one scale (vLLM's
``concat_and_cache_mla`` scales both by ``k_scale``), so ``kv_bmm_quantizer`` and ``pe_bmm_quantizer`` share their max.

Only modules of one layer are tied: after the fixup (tensor-parallel shards and peer-max inputs already agree
across ranks) the rule is local to each rank and each layer, so the resident run and the layer-streamed run
(per layer) apply it alike, with no collective.
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.nn import TensorQuantizer

from deepseek_ptq.quant.fixup import _set_amax, is_scalar_amax
from deepseek_ptq.quant.modules import QuantMLA, _QuantLinearMixin, kv_cache_quantizers

# The amax.csv source of a value raised to its fused partner's.
FUSED_MAX = "fused_max"
# (first, second) linear of each fused pair, as the last component of the module path.
FUSED_PAIRS = (("w1", "w3"), ("wq_a", "wkv_a"))
ROLES = ("weight", "input")


def partner(module: str) -> str | None:
    """The module fused with ``module`` (``layers.1.ffn.experts.3.w1`` -> ``...w3``), or None."""
    prefix, _, last = module.rpartition(".")
    for a, b in FUSED_PAIRS:
        if last in (a, b):
            return f"{prefix}.{b if last == a else a}"
    return None


def fused_pairs(modules: list[str]) -> list[tuple[str, str]]:
    """Every fused pair among ``modules`` (each pair once, its first linear first)."""
    present = set(modules)
    firsts = {a for a, _ in FUSED_PAIRS}
    return [(m, p) for m in modules if m.rpartition(".")[2] in firsts and (p := partner(m)) in present]


def _tied(q: TensorQuantizer) -> bool:
    """A quantizer whose amax is one per-tensor value an engine turns into one scale (NVFP4's global, FP8's)."""
    return type(q) is TensorQuantizer and not q._disabled and "_amax" in q._buffers and is_scalar_amax(q)


@torch.no_grad()
def apply_engine_constraints(model: torch.nn.Module) -> dict[str, str]:
    """Each fused pair's weight amax and input amax, and each attention's two KV-cache amax, set to the max of the
    two (see the module docstring).

    Returns quantizer path -> ``fused_max`` for every amax that was raised (one host read for all of them).
    """
    linears: dict[str, torch.nn.Module] = {}
    attentions: list[tuple[str, QuantMLA]] = []
    for name, module in model.named_modules():  # one walk for both
        if isinstance(module, _QuantLinearMixin):
            linears[name] = module
        elif isinstance(module, QuantMLA):
            attentions.append((name, module))
    pairs: list[tuple[str, TensorQuantizer, str, TensorQuantizer]] = []
    for a, b in fused_pairs(list(linears)):
        for role in ROLES:
            qa, qb = linears[a]._modules[f"{role}_quantizer"], linears[b]._modules[f"{role}_quantizer"]
            if _tied(qa) and _tied(qb):
                pairs.append((f"{a}.{role}_quantizer", qa, f"{b}.{role}_quantizer", qb))
    for name, attn in attentions:
        cache = kv_cache_quantizers(attn)
        if len(cache) == 2 and all(_tied(q) for _, q in cache):
            (ka, qa), (kb, qb) = cache
            pairs.append((f"{name}.{ka}", qa, f"{name}.{kb}", qb))
    if not pairs:
        return {}
    first = torch.stack([qa._amax.float().reshape(()) for _, qa, _, _ in pairs])
    second = torch.stack([qb._amax.float().reshape(()).to(first.device) for _, _, _, qb in pairs])
    shared = torch.maximum(first, second)
    raised_first, raised_second = (first < shared).tolist(), (second < shared).tolist()
    targets: list[TensorQuantizer] = []
    slots: list[int] = []
    sources: dict[str, str] = {}
    for i, (name_a, qa, name_b, qb) in enumerate(pairs):
        for name, q, raised in ((name_a, qa, raised_first[i]), (name_b, qb, raised_second[i])):
            if raised:
                targets.append(q)
                slots.append(i)
                sources[name] = FUSED_MAX
    _set_amax(targets, slots, shared)
    return sources


def shared_amax(amax: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """A run's amax dict (quantizer state keys) with each fused pair's per-tensor amax set to the pair's max:
    what the run applied (a run made before the rule was applied in the run differs; the export then warns)."""
    out = dict(amax)
    for a, b in fused_pairs(modules):
        for role in ROLES:
            ka, kb = f"{a}.{role}_quantizer._amax", f"{b}.{role}_quantizer._amax"
            if ka in amax and kb in amax and amax[ka].numel() == 1 and amax[kb].numel() == 1:
                shared = torch.maximum(amax[ka].float().reshape(()), amax[kb].float().reshape(()))
                out[ka], out[kb] = shared.to(amax[ka].dtype), shared.to(amax[kb].dtype)
    return out
