"""Where fast and plain calibration differ, and why: per MoE layer, the layer's inputs, routing and amax.

    python -m deepseek_ptq.devtools.fast_vs_plain --out fvp.json                 # ds_v3_slice on the GPU
    python -m deepseek_ptq.devtools.fast_vs_plain model=tiny data=text --device cpu

Both paths calibrate a fresh model (same weights, same batches) in each mode; the input of every MoE layer
(the ffn_norm output) is kept. Per MoE layer it reports: how many tokens entered the layer with different
values in the two runs, how many tokens the gate routes to a different expert set, how many expert amax differ
(by linear), and, for every differing expert w2-input amax, a recomputation from each run's own layer inputs
(max |silu(x W1^T) * (x W3^T)| with the dequantized weights, the plain path's own calls): when each run's amax
equals the recomputation from its own inputs, the layer's statistics agree and the difference came in with
the inputs, i.e. from the layers above.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F

from deepseek_ptq.devtools.bench import compose, quantizer_amax, with_slice_defaults


def _calibrate_capturing(cfg: Any, args: Any, batches: list[torch.Tensor], device: torch.device, mode: str,
                         fast: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """A fresh model calibrated on ``batches``; (model, amax by quantizer, MoE layer -> its inputs on the CPU)."""
    from deepseek_ptq.model.load import build_model, checkpoint_dir
    from deepseek_ptq.model.parallel import Parallel
    from deepseek_ptq.quant.calibrate import calibrate
    from deepseek_ptq.quant.recipes import build_quant_config

    model = build_model(args, checkpoint_dir(cfg.model, args, 1), Parallel(), device, progress=False)
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for layer, _ in model.moe_layers():
        inputs[layer] = []
        norm = model.layers[layer].ffn_norm
        hooks.append(norm.register_forward_hook(
            lambda _m, _i, out, layer=layer: inputs[layer].append(out.detach().reshape(-1, out.shape[-1]).cpu())))
    try:
        calibrate(model, build_quant_config(cfg.quant, on_cpu=device.type == "cpu"), batches, mode == "all_experts",
                  device, progress=False, fast=fast)
    finally:
        for h in hooks:
            h.remove()
    # modelopt's weight-only pass and AWQ-like loops may run extra forwards: keep the last pass over the batches
    n = len(batches)
    return model, quantizer_amax(model), {k: torch.cat(v[-n:]) for k, v in inputs.items()}


@torch.no_grad()
def _w2_input_amax(expert: torch.nn.Module, x: torch.Tensor, chunk: int = 8192) -> float:
    """max |silu(x W1^T) * (x W3^T)| over the rows of x, with the plain path's ops (one F.linear per weight)."""
    w1, w3 = expert.w1.dequantized_weight(), expert.w3.dequantized_weight()
    best = torch.zeros((), dtype=torch.float32, device=w1.device)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].to(w1.device)
        h = F.silu(F.linear(part, w1)) * F.linear(part, w3)
        best = torch.maximum(best, h.abs().amax().float())
    return float(best)


@torch.no_grad()
def _routing(moe: torch.nn.Module, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Each token's chosen expert set (sorted indices), from the layer's own gate."""
    out = []
    for start in range(0, x.shape[0], chunk):
        _, indices = moe.gate(x[start:start + chunk].to(moe.gate.weight.device))
        out.append(indices.sort(dim=-1).values.cpu())
    return torch.cat(out)


def _key_kind(name: str) -> str | None:
    """'w1'/'w2'/'w3' input or weight of a routed expert, else None."""
    parts = name.split(".")
    if "experts" not in parts:
        return None
    return f"{parts[parts.index('experts') + 2]}.{parts[-1].replace('_quantizer', '')}"


def compare_layers(plain: dict[str, torch.Tensor], fast: dict[str, torch.Tensor], plain_in: dict[int, torch.Tensor],
                   fast_in: dict[int, torch.Tensor], model: torch.nn.Module, recompute: int) -> list[dict[str, Any]]:
    """Per MoE layer: differing input tokens, routing flips, differing expert amax by kind, and (all-experts
    statistics: every expert saw every token) ``recompute`` differing w2-input amax recomputed from each run."""
    rows = []
    moes = dict(model.moe_layers())
    for layer, moe in moes.items():
        xp, xf = plain_in[layer], fast_in[layer]
        differs = (xp != xf).any(dim=-1)
        rel = ((xp.float() - xf.float()).abs().amax(-1) / xp.float().abs().amax(-1).clamp_min(1e-30))
        flips = (_routing(moe, xp) != _routing(moe, xf)).any(dim=-1)
        row: dict[str, Any] = {"layer": layer, "tokens": int(xp.shape[0]), "tokens_input_differs": int(differs.sum()),
                               "input_max_rel_diff": float(rel.max()), "tokens_routing_differs": int(flips.sum()),
                               "amax": {}, "w2_recomputed": []}
        prefix = f"layers.{layer}.ffn.experts."
        for name in sorted(k for k in plain if k.startswith(prefix)):
            kind = _key_kind(name)
            a, b = plain[name], fast.get(name)
            entry = row["amax"].setdefault(kind, {"n": 0, "differ": 0, "max_rel": 0.0})
            entry["n"] += 1
            if b is None or not torch.equal(a, b):
                entry["differ"] += 1
                entry["max_rel"] = max(entry["max_rel"], float(((b - a).abs() / a.abs().clamp_min(1e-30)).max())
                                       if b is not None else float("inf"))
                if kind == "w2.input" and len(row["w2_recomputed"]) < recompute:
                    expert = moe.experts[int(name[len(prefix):].split(".")[0])]
                    row["w2_recomputed"].append({
                        "quantizer": name, "plain": float(a.max()), "fast": float(b.max()) if b is not None else None,
                        "from_plain_inputs": _w2_input_amax(expert, xp), "from_fast_inputs": _w2_input_amax(expert, xf)})
        if recompute:  # the recomputation itself, on the first local expert: it must give the plain run's amax
            first = moe.experts_start
            control = plain.get(f"{prefix}{first}.w2.input_quantizer")
            row["w2_control"] = {"plain": float(control.max()) if control is not None else None,
                                 "from_plain_inputs": _w2_input_amax(moe.experts[first], xp)}
        checked = row["w2_recomputed"]
        row["w2_explained_by_inputs"] = sum(
            r["from_plain_inputs"] == r["plain"] and r["from_fast_inputs"] == r["fast"] for r in checked)
        rows.append(row)
    return rows


def run(overrides: list[str], modes: list[str], n_batches: int, device: torch.device,
        recompute: int) -> dict[str, Any]:
    from deepseek_ptq.model.load import checkpoint_dir, resolve_args
    from deepseek_ptq.pipeline.data import make_batches

    base = with_slice_defaults(overrides)
    cfg = compose(base)
    args = resolve_args(cfg.model)
    batches = make_batches(cfg.data, args.vocab_size, str(checkpoint_dir(cfg.model, args, 1)), 0).calib[:n_batches]
    out: dict[str, Any] = {"overrides": base, "batches": [list(b.shape) for b in batches], "modes": {}}
    if device.type == "cuda":
        out["card"] = torch.cuda.get_device_name(device)
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        print(f"[fast_vs_plain] {mode}: plain", file=sys.stderr, flush=True)
        model, plain, plain_in = _calibrate_capturing(cfg, args, batches, device, mode, fast=False)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[fast_vs_plain] {mode}: fast", file=sys.stderr, flush=True)
        model, fast, fast_in = _calibrate_capturing(cfg, args, batches, device, mode, fast=True)
        every = [k for k in plain if k in fast]
        out["modes"][mode] = {
            "amax_compared": len(every), "amax_identical": sum(torch.equal(plain[k], fast[k]) for k in every),
            "only_in_one": len(set(plain) ^ set(fast)),
            # the recomputation is of all-token statistics: top-k runs' experts saw only their routed tokens
            "layers": compare_layers(plain, fast, plain_in, fast_in, model, recompute if mode == "all_experts" else 0),
            "peak_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
        del model, plain_in, fast_in
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: model=ds_v3_slice data=synthetic ...)")
    parser.add_argument("--modes", default="topk,all_experts")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--recompute", type=int, default=12, help="differing w2 amax recomputed per layer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    a = parser.parse_args(argv)
    result = run(a.overrides, a.modes.split(","), a.batches, torch.device(a.device), a.recompute)
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    for mode, r in result["modes"].items():
        print(f"{mode}: {r['amax_identical']} of {r['amax_compared']} amax identical")
        for row in r["layers"]:
            kinds = ", ".join(f"{k} {v['differ']}/{v['n']} (max {v['max_rel']:.1%})" for k, v in row["amax"].items()
                              if v["differ"])
            print(f"  layer {row['layer']}: inputs differ in {row['tokens_input_differs']}/{row['tokens']} tokens "
                  f"(max rel {row['input_max_rel_diff']:.2e}), routing in {row['tokens_routing_differs']}; "
                  f"differing amax: {kinds or 'none'}" + (f"; w2 explained by inputs {row['w2_explained_by_inputs']}"
                                                           f"/{len(row['w2_recomputed'])}" if "w2_control" in row else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
