"""Calibration benchmark: time per batch against the hardware floor (``python -m deepseek_ptq.devtools.bench``).

On the device it runs on, it measures the two ceilings (bf16 matmul rate on random data; device copy
bandwidth, bytes read plus bytes written), the FP8 block dequant kernel against the copy bandwidth, then
calibrates ``model=ds_v3_slice`` (random FP8 weights made on the GPU) through the project's ``calibrate()``
with real modelopt quantizers, per calibration mode and path, timing every batch after one warm-up batch,
and the peer-max fixup: on the slice itself, and on the 61-layer model's quantizer layout at W = 8 in one
process (``bench_fixup``). Floors: the larger of (GEMM FLOPs of the work the mode defines, over the matmul
rate) and (every FP8 weight read once, over the copy bandwidth). Prints a table; writes JSON (``--out``).

    python -m deepseek_ptq.devtools.bench --out bench.json                      # slice, NVFP4, fast path, both modes
    python -m deepseek_ptq.devtools.bench --plain-batches 2 quant=fp8 model.n_layers=6   # + the plain path; overrides
    python -m deepseek_ptq.devtools.bench model=ds_v32_slice --out v32.json  # V3.2: + what the indexer costs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deepseek_ptq.model.args import ModelArgs

MODES = ("topk", "all_experts")


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int = 3, reps: int = 20,
                   inner: int = 5) -> float:
    """Median time of ``fn`` per call, over ``reps`` timings of ``inner`` back-to-back calls (CUDA events on a
    GPU): back to back, the launch of the next call overlaps the current one, as in a real forward."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (read + write bytes) and bf16 matmul rate, on random data, on this device."""
    gen = torch.Generator(device=device).manual_seed(0)
    n_copy = (1 << 29) if device.type == "cuda" else (1 << 23)  # bf16 elements: 1 GiB on a GPU
    src = torch.randn(n_copy, generator=gen, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = median_seconds(lambda: dst.copy_(src), device)
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.bfloat16)
    t_mm = median_seconds(lambda: a @ b, device, reps=10, inner=3)
    del src, dst, a, b
    return {"copy_GBps": 2 * n_copy * 2 / t_copy / 1e9, "copy_bytes": 4 * n_copy,
            "matmul_TFLOPs": 2 * n**3 / t_mm / 1e12, "matmul_n": n}


def measure_dequant(device: torch.device, copy_gbps: float) -> list[dict[str, Any]]:
    """The Triton FP8 block dequant (3 bytes per element moved) against the copy bandwidth."""
    if device.type != "cuda":
        return []
    from deepseek_ptq.model import triton_kernels as tk
    from deepseek_ptq.model.kernels import dequant_torch

    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for shape in ((18432, 7168), (16, 2048, 7168)):
        w = (torch.randn(shape, generator=gen, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.rand((*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128)), generator=gen, device=device) + 0.5
        out = torch.empty(shape, dtype=torch.bfloat16, device=device)
        if len(shape) == 2:
            fn = lambda: tk.fp8_block_dequant(w, s, out=out)  # noqa: E731
            exact = torch.equal(fn(), dequant_torch(w, s))
        else:
            fn = lambda: tk.batched_fp8_block_dequant(w, s, out=out)  # noqa: E731
            exact = torch.equal(fn()[3], dequant_torch(w[3], s[3]))
        t = median_seconds(fn, device)
        gbps = 3 * w.numel() / t / 1e9
        rows.append({"shape": "x".join(map(str, shape)), "us": t * 1e6, "GBps": gbps,
                     "pct_of_copy": 100 * gbps / copy_gbps, "bit_identical_to_torch": exact})
    return rows


# ---------------------------------------------------------------------------------------------- floors


def calib_flops(args: ModelArgs, batch: int, seq: int) -> dict[str, float]:
    """GEMM FLOPs of one calibration batch (no head: calibration stops at the final norm), by mode.

    topk: attention (projections and the causal score/value products; V3.2: the indexer's projections and its
    score of every query against every key), dense MLP, gate, shared experts, k routed experts per token. all_experts: every token through every expert (w1, w2, w3), which also gives
    the top-k output, as the mode's work is defined; all_experts_min: what its statistics strictly need
    (w1/w3 of every token and expert; w2 only for the routed tokens, whose output is used).
    """
    tokens = batch * seq
    heads, qk, v = args.n_heads, args.qk_head_dim, args.v_head_dim
    q_params = (args.dim * args.q_lora_rank + args.q_lora_rank * heads * qk) if args.q_lora_rank else args.dim * heads * qk
    attn_params = (q_params + args.dim * (args.kv_lora_rank + args.qk_rope_head_dim)
                   + args.kv_lora_rank * heads * (args.qk_nope_head_dim + v) + heads * v * args.dim)
    attn_core = batch * heads * seq * (seq + 1) / 2 * 2 * (qk + v)  # causal: (s+1)/2 keys per query on average
    indexer = 0.0
    if args.has_indexer:  # wq_b, wk, weights_proj, then q.k for every (query, key, head): the full square
        ih, idim = args.index_n_heads, args.index_head_dim
        indexer = 2 * tokens * (args.q_lora_rank * ih * idim + args.dim * idim + args.dim * ih) + \
            2 * batch * ih * seq * seq * idim
    expert = 3 * args.dim * args.moe_inter_dim
    common = args.n_layers * (2 * tokens * attn_params + attn_core + indexer)
    common += args.n_dense_layers * 2 * tokens * 3 * args.dim * args.inter_dim
    moe_layers = args.n_layers - args.n_dense_layers
    common += moe_layers * 2 * tokens * (args.dim * args.n_routed_experts + args.n_shared_experts * expert)
    routed = moe_layers * 2 * tokens * args.n_activated_experts * expert
    every = moe_layers * 2 * tokens * args.n_routed_experts * expert
    return {"topk": common + routed, "all_experts": common + every,
            "all_experts_min": common + every * 2 / 3 + routed / 3, "indexer": args.n_layers * indexer}


def fp8_weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)


def floor_seconds(flops: float, weight_bytes: int, ceilings: dict[str, float]) -> dict[str, float]:
    compute = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    memory = weight_bytes / (ceilings["copy_GBps"] * 1e9)
    return {"floor_s": max(compute, memory), "compute_s": compute, "weight_read_s": memory,
            "bound": "compute" if compute >= memory else "memory"}


def bench_indexer(device: torch.device, args: ModelArgs, batch: int, seq: int) -> dict[str, Any]:
    """What DeepSeek-V3.2's indexer costs in one attention block (unquantized, random weights): the indexer's own
    forward, and the block's forward with it (a boolean top-k mask into SDPA) and without it (SDPA's causal path)."""
    from deepseek_ptq.model.attention import MLA, precompute_freqs_cis
    from deepseek_ptq.model.parallel import Parallel
    from deepseek_ptq.model.synthetic import init_random_

    with torch.device(device):
        mla = MLA(args, Parallel(), args.dtype == "fp8")
    init_random_(mla, 0)
    gen = torch.Generator(device=device).manual_seed(4)
    x = torch.randn(batch, seq, args.dim, generator=gen, device=device, dtype=torch.bfloat16)
    freqs = precompute_freqs_cis(args)[:seq].to(device)
    with torch.no_grad():
        qr = mla.q_norm(mla.wq_a(x))
        kept = mla.indexer(x, qr, freqs)
        indexer_s = median_seconds(lambda: mla.indexer(x, qr, freqs), device, reps=10, inner=3)
        with_s = median_seconds(lambda: mla(x, freqs), device, reps=10, inner=3)
        indexer, mla.indexer = mla.indexer, None
        without_s = median_seconds(lambda: mla(x, freqs), device, reps=10, inner=3)
        mla.indexer = indexer
    causal_keys = seq * (seq + 1) / 2
    return {"batch": batch, "seq": seq, "index_topk": args.index_topk, "indexer_ms": indexer_s * 1e3,
            "attention_with_ms": with_s * 1e3, "attention_without_ms": without_s * 1e3,
            "extra_ms_per_layer": (with_s - without_s) * 1e3, "extra_s_per_batch": (with_s - without_s) * args.n_layers,
            "kept_share_of_causal_keys": float(kept.sum()) / (batch * causal_keys)}


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Setup:
    """What every run of one bench invocation shares."""

    cfg: Any
    args: ModelArgs
    device: torch.device
    batches: list[torch.Tensor]


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from deepseek_ptq.pipeline.app import CONF_DIR  # registers the schema

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


SLICE_DEFAULTS = ["model=ds_v3_slice", "quant=nvfp4", "data=synthetic", "logger=none", "data.batch_size=8",
                  "data.seq_len=512"]


def with_slice_defaults(overrides: list[str]) -> list[str]:
    """The benchmark's defaults (the 671B slice, 8 x 512 synthetic tokens), except those ``overrides`` set."""
    chosen = {o.split("=", 1)[0] for o in overrides}
    return [d for d in SLICE_DEFAULTS if d.split("=", 1)[0] not in chosen] + overrides


def quantizer_amax(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m._amax.detach().float().cpu().clone() for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and getattr(m, "_amax", None) is not None}


def run_calibration(setup: Setup, mode: str, fast: bool, n_batches: int, profile_path: str | None = None,
                    fast_options: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One fresh model, calibrated on 1 warm-up + ``n_batches`` batches; returns (figures, amax by quantizer).

    ``profile_path``: write torch.profiler's table of the second timed batch there (needs 2 timed batches).
    ``fast_options``: the fast path's quant.fast.FastOptions (None: its defaults).
    """
    from deepseek_ptq.model.load import build_model, checkpoint_dir
    from deepseek_ptq.model.parallel import Parallel
    from deepseek_ptq.quant.calibrate import calibrate
    from deepseek_ptq.quant.fixup import fixup
    from deepseek_ptq.quant.recipes import build_quant_config

    device, cfg = setup.device, setup.cfg
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        t0 = time.perf_counter()
        model = build_model(setup.args, checkpoint_dir(cfg.model, setup.args, 1), Parallel(), device, progress=False)
        _sync(device)
        t_build = time.perf_counter() - t0
        stamps: list[float] = []
        profiler = None

        def on_batch(i: int) -> None:
            nonlocal profiler
            _sync(device)
            if i <= n_batches:
                stamps.append(time.perf_counter())
            if profile_path and i == n_batches:  # one more batch, after the timed ones, under the profiler
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                profiler = torch.profiler.profile(activities=activities)
                profiler.start()
            elif profiler is not None and i == n_batches + 1:
                profiler.stop()
                key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
                with open(profile_path, "w") as f:
                    f.write(profiler.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))

        mtq_cfg = build_quant_config(cfg.quant, on_cpu=device.type == "cpu")
        t1 = time.perf_counter()
        count = 1 + n_batches + (1 if profile_path else 0)
        calibrate(model, mtq_cfg, setup.batches[:count], mode == "all_experts", device, False, on_batch=on_batch,
                  fast=fast, fast_options=fast_options)
        t_end = time.perf_counter()
        per_batch = [b - a for a, b in zip(stamps, stamps[1:])]
        report = fixup(model, Parallel(), sync_experts=mode == "topk", device=device)
        result = {
            "mode": mode, "path": "fast" if fast else "plain", "batches": len(per_batch),
            "batch_shape": list(setup.batches[0].shape),
            "s_per_batch": statistics.median(per_batch) if per_batch else None,
            "s_per_batch_mean": statistics.fmean(per_batch) if per_batch else None,
            "s_per_batch_all": per_batch,
            "build_s": t_build, "setup_and_warmup_s": stamps[0] - t1 if stamps else None,
            "after_last_batch_s": t_end - stamps[-1] if stamps else None,
            "fixup_s": report.seconds, "fixup_collectives": report.collectives,
            "fp8_weight_bytes": fp8_weight_bytes(model),
            "peak_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        }
        if result["s_per_batch"]:
            result["tokens_per_s"] = setup.batches[0].numel() / result["s_per_batch"]
        amax = quantizer_amax(model)
        del model
        return result, amax
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _group(name: str) -> str:
    kind = "input" if ".input_quantizer" in name else "weight"
    if ".experts." in name:
        return f"expert {name.split('.experts.')[1].split('.')[1]} {kind}"
    return f"other {kind}"


def compare_amax(plain: dict[str, torch.Tensor], fast: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per group of quantizers: how many amax agree bit for bit, and the largest relative gap."""
    groups: dict[str, dict[str, Any]] = {}
    for name in sorted(set(plain) | set(fast)):
        g = groups.setdefault(_group(name), {"compared": 0, "identical": 0, "missing": 0, "max_rel": 0.0, "worst": None})
        if name not in plain or name not in fast:
            g["missing"] += 1
            continue
        a, b = plain[name], fast[name]
        g["compared"] += 1
        g["identical"] += int(torch.equal(a, b))
        rel = ((a - b).abs() / a.abs().clamp_min(1e-30)).max().item() if a.shape == b.shape else float("inf")
        if rel > g["max_rel"]:
            g["max_rel"], g["worst"] = rel, [name, a.max().item(), b.max().item()]
    return groups


def check_combine(device: torch.device, combine: str = "auto") -> dict[str, Any]:
    """The Triton combine against the torch ops at the slice's shapes, and which one the fast path uses
    (``combine``: FastOptions.combine)."""
    from deepseek_ptq.quant.fast import moe as fast_moe

    gen = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(4), "little"))
    rows, dim, tokens, k = 32768, 7168, 4096, 8
    out = (torch.randn(rows, dim, generator=gen, device=device) * 3).bfloat16()
    pos = torch.randperm(rows, generator=gen, device=device).view(tokens, k)
    weights = torch.rand(tokens, k, generator=gen, device=device).bfloat16()
    result: dict[str, Any] = {}
    try:
        from deepseek_ptq.model import triton_kernels

        got = triton_kernels.moe_combine(out, pos, weights)
        want = fast_moe.moe_combine_torch(out, pos, weights)
        result["identical"] = bool(torch.equal(got, want))
        result["differing_elements"] = int((got != want).sum())
        result["triton_us"] = median_seconds(lambda: triton_kernels.moe_combine(out, pos, weights), device) * 1e6
        result["torch_us"] = median_seconds(lambda: fast_moe.moe_combine_torch(out, pos, weights), device) * 1e6
    except Exception as err:
        result["error"] = repr(err)[:300]
    result["used"] = "triton" if fast_moe.uses_triton_combine(device, combine) else "torch"
    return result


# ---------------------------------------------------------------------------------------------- grouped GEMMs

# ("weights_m" fails on CUDA: torch 2.11 asserts that every group's token count is a multiple of 8.)
GROUPED_VARIANTS = [("tokens_m", False), ("tokens_m", True)]


def bench_grouped(device: torch.device, args: ModelArgs, num_tokens: int) -> dict[str, Any]:
    """One MoE layer's routed GEMMs (w1|w3, then w2) at the model's shapes, routed by a random gate of the
    model's kind, per grouped-GEMM layout (quant/fast_moe.py): time, bytes and FLOP rates, agreement."""
    from deepseek_ptq.model.moe import Gate
    from deepseek_ptq.quant.fast.moe import grouped_linear

    gen = torch.Generator(device=device).manual_seed(0)
    n, dim, inter = args.n_routed_experts, args.dim, args.moe_inter_dim
    bf16 = torch.bfloat16
    w13 = torch.randn(n, 2 * inter, dim, generator=gen, device=device, dtype=bf16) * dim ** -0.5
    w2 = torch.randn(n, dim, inter, generator=gen, device=device, dtype=bf16) * inter ** -0.5
    with torch.device(device):
        gate = Gate(args)
    gate.weight.data.copy_(torch.randn(gate.weight.shape, generator=gen, device=device) * dim ** -0.5)
    if gate.bias is not None:
        gate.bias.data.copy_(torch.randn(gate.bias.shape, generator=gen, device=device) * 0.05)
    x = torch.randn(num_tokens, dim, generator=gen, device=device, dtype=bf16)
    _, indices = gate(x)
    expert = indices.reshape(-1)
    order = torch.argsort(expert, stable=True)
    sizes = torch.bincount(expert, minlength=n)
    ends = sizes.cumsum(0).to(torch.int32)
    rows = order.numel()
    flops = 2 * rows * 3 * dim * inter
    out: dict[str, Any] = {"tokens": num_tokens, "routings": rows, "experts": n,
                           "tokens_per_expert": {"min": int(sizes.min()), "median": float(sizes.float().median()),
                                                 "max": int(sizes.max())},
                           "weight_bytes": (w13.numel() + w2.numel()) * 2, "variants": []}
    reference = None
    for layout, pad in GROUPED_VARIANTS:
        entry: dict[str, Any] = {"layout": layout, "pad": pad}
        try:
            padded = max(rows, n * 129) if pad else rows
            xs = torch.zeros(padded, dim, device=device, dtype=bf16)
            xs[:rows] = x.index_select(0, order // indices.shape[1])
            a = grouped_linear(xs, w13, ends, layout)
            h = torch.zeros(padded, inter, device=device, dtype=bf16)
            h[:rows] = torch.nn.functional.silu(a[:rows, :inter]) * a[:rows, inter:]
            y = grouped_linear(h, w2, ends, layout)[:rows].float()
            if reference is None:
                reference = y
            entry["rel_diff_to_first"] = ((y - reference).norm() / reference.norm()).item()
            entry["w13_us"] = median_seconds(lambda: grouped_linear(xs, w13, ends, layout), device, reps=10, inner=3) * 1e6
            entry["w2_us"] = median_seconds(lambda: grouped_linear(h, w2, ends, layout), device, reps=10, inner=3) * 1e6
            total = (entry["w13_us"] + entry["w2_us"]) / 1e6
            entry.update({"total_us": total * 1e6, "weight_GBps": out["weight_bytes"] / total / 1e9,
                          "TFLOPs": flops / total / 1e12})
            del xs, a, h, y
        except Exception as err:  # a layout this torch build refuses: recorded, not fatal
            entry["error"] = repr(err)[:300]
        out["variants"].append(entry)
    out["all_experts_gemm"] = check_stacked_gemm(x, w13)
    return out


def check_stacked_gemm(x: torch.Tensor, w13: torch.Tensor, experts: int = 32) -> dict[str, Any]:
    """max |silu(x w1^T) * (x w3^T)| per expert three ways: the plain path's calls (one F.linear per weight), one
    GEMM over several experts' stacked weights, and float32; the largest relative gaps between them."""
    F = torch.nn.functional
    inter = w13.shape[1] // 2
    experts = min(experts, w13.shape[0])
    a = F.linear(x, w13[:experts].reshape(-1, x.shape[1])).view(x.shape[0], experts, 2, inter)
    stacked = torch.linalg.vector_norm(F.silu(a[:, :, 0]) * a[:, :, 1], float("inf"), dim=(0, 2)).float()
    del a
    per, exact = [], []
    for e in range(experts):
        per.append(torch.linalg.vector_norm(F.silu(F.linear(x, w13[e, :inter])) * F.linear(x, w13[e, inter:]), float("inf")))
        xf = x.float()
        exact.append((F.silu(xf @ w13[e, :inter].float().T) * (xf @ w13[e, inter:].float().T)).abs().max())
    per_t, exact_t = torch.stack(per).float(), torch.stack(exact)

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs() / b).max().item()

    return {"experts": experts, "stacked_vs_per_expert": gap(stacked, per_t), "per_expert_vs_fp32": gap(per_t, exact_t),
            "stacked_vs_fp32": gap(stacked, exact_t), "differ": int((stacked != per_t).sum())}


# ---------------------------------------------------------------------------------------------- fixup at W=8


def fixup_shape_args(n_layers: int = 61, n_dense_layers: int = 3) -> ModelArgs:
    """The 671B model's layer and expert counts (what the fixup's work depends on) with small matrices."""
    return ModelArgs(dtype="fp8", vocab_size=1024, dim=256, inter_dim=1024, moe_inter_dim=128,
                     n_layers=n_layers, n_dense_layers=n_dense_layers, n_heads=8, n_routed_experts=256,
                     n_shared_experts=1, n_activated_experts=8, n_expert_groups=8, n_limited_groups=4,
                     score_func="sigmoid", route_scale=2.5, gate_bias=True, q_lora_rank=128, kv_lora_rank=128,
                     qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, max_seq_len=256)


def bench_fixup(device: torch.device, quant_cfg: Any, world_size: int = 8, n_layers: int = 61,
                repeats: int = 3, profile_path: str | None = None) -> dict[str, Any]:
    """The fixup's own time for rank 0 of a W-rank layout (its 256/W experts per layer), in one process.

    The collective runs over a process group of one rank: its payload is one vector of a few hundred floats,
    so the time is the fixup's own work (building the vector, reading and writing every quantizer's amax),
    not the network's. The model is calibrated first (all-experts mode: every local expert has an amax).
    """
    import torch.distributed as dist

    from deepseek_ptq.model.parallel import Parallel
    from deepseek_ptq.model.synthetic import init_random_
    from deepseek_ptq.model.transformer import Transformer
    from deepseek_ptq.pipeline.launch import free_port
    from deepseek_ptq.quant.calibrate import calibrate
    from deepseek_ptq.quant.fixup import fixup
    from deepseek_ptq.quant.modules import quantized_linears
    from deepseek_ptq.quant.recipes import build_quant_config

    created = not dist.is_initialized()
    if created:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}",
                                device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None)
    try:
        args = fixup_shape_args(n_layers)
        par = Parallel(rank=0, world_size=world_size, group=dist.group.WORLD)
        t0 = time.perf_counter()
        with torch.device(device):
            model = Transformer(args, par)
        init_random_(model, 0)
        model.eval()
        # Tokens of rank 0's vocabulary part: its embedding shard holds them (the others would embed zeros).
        tokens = torch.randint(0, args.vocab_size // world_size, (1, 64), generator=torch.Generator().manual_seed(0))
        calibrate(model, build_quant_config(quant_cfg, on_cpu=device.type == "cpu"), [tokens], True, device, False)
        t_setup = time.perf_counter() - t0
        result: dict[str, Any] = {"world_size_layout": world_size, "n_layers": n_layers, "moe_layers": args.n_moe_layers,
                                  "local_experts_per_layer": args.n_routed_experts // world_size,
                                  "quantizers_on_rank": sum(2 for _ in quantized_linears(model)), "setup_s": t_setup}
        times = []
        for _ in range(1 + repeats):
            _sync(device)
            report = fixup(model, par, sync_experts=True, device=device)
            _sync(device)
            times.append(report.seconds)
        result.update({"first_s": times[0], "repeat_median_s": statistics.median(times[1:]) if repeats else None,
                       "synced_input_amax": report.synced_input_amax, "tp_synced_amax": report.tp_synced_amax,
                       "collectives": report.collectives})
        if profile_path:  # where the fixup's time goes (Python profile of one more call)
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.runcall(fixup, model, par, True, device)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
            with open(profile_path, "w") as f:
                f.write(text.getvalue())
        return result
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- main


def card(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "sms": props.multi_processor_count, "memory_GB": props.total_memory / 1e9})
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
        try:
            q = "name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu"
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"failed: {err!r}"
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def format_table(results: dict[str, Any]) -> str:
    lines = [f"card: {results['card'].get('gpu', results['card'].get('cpu'))}  ceilings: copy "
             f"{results['ceilings']['copy_GBps']:.0f} GB/s, bf16 matmul {results['ceilings']['matmul_TFLOPs']:.0f} TFLOP/s"]
    for row in results["dequant"]:
        lines.append(f"fp8 dequant {row['shape']}: {row['us']:.1f} us, {row['GBps']:.0f} GB/s = "
                     f"{row['pct_of_copy']:.0f}% of copy (bit-identical: {row['bit_identical_to_torch']})")
    grouped = results.get("grouped")
    if grouped:
        lines.append(f"grouped GEMMs of one MoE layer ({grouped['routings']} routings, tokens per expert "
                     f"{grouped['tokens_per_expert']}); used: {grouped.get('used')}")
        for v in grouped["variants"]:
            lines.append(f"  {v['layout']:<10}{'pad' if v['pad'] else '':<4}" + (
                f"w13 {v['w13_us']:.0f} us, w2 {v['w2_us']:.0f} us, weights at {v['weight_GBps']:.0f} GB/s, "
                f"{v['TFLOPs']:.0f} TFLOP/s, rel diff {v['rel_diff_to_first']:.1e}" if "total_us" in v else v.get("error", "")))
    ix = results.get("indexer")
    if ix:
        lines.append(f"indexer ({ix['batch']} x {ix['seq']} tokens, top-{ix['index_topk']}, "
                     f"{100 * ix['kept_share_of_causal_keys']:.0f}% of causal keys kept): {ix['indexer_ms']:.2f} ms a "
                     f"layer; attention {ix['attention_with_ms']:.2f} ms with it, {ix['attention_without_ms']:.2f} ms "
                     f"without; {ix['extra_s_per_batch']:.4f} s a batch over the layers")
    head = f"{'mode':<12}{'path':<6}{'batches':>8}{'s/batch':>10}{'tok/s':>10}{'floor s':>9}{'ratio':>7}" \
           f"{'fixup ms':>10}{'peak GB':>9}{'setup s':>9}"
    lines += [head, "-" * len(head)]
    for r in results["runs"]:
        spb = r.get("s_per_batch")
        lines.append(f"{r['mode']:<12}{r['path']:<6}{r['batches']:>8}{spb or float('nan'):>10.4f}"
                     f"{r.get('tokens_per_s', float('nan')):>10.0f}{r['floor_s']:>9.4f}{r.get('ratio', float('nan')):>7.2f}"
                     f"{r['fixup_s'] * 1e3:>10.1f}{r['peak_GB'] or float('nan'):>9.1f}{r['setup_and_warmup_s'] or 0:>9.1f}")
        if "ratio_min" in r:
            lines.append(f"{'':<18}(all-experts floor of the needed work: {r['floor_min_s']:.4f} s, ratio {r['ratio_min']:.2f})")
    for key, cmp in results.get("fast_vs_plain", {}).items():
        lines.append(f"fast vs plain amax, {key}: " + "; ".join(
            f"{g}: {v['identical']}/{v['compared']} identical, max rel {v['max_rel']:.2e}" for g, v in cmp.items()))
    if results.get("combine_check"):
        lines.append(f"combine kernel check: {results['combine_check']}")
    if results.get("fixup_w8"):
        f = results["fixup_w8"]
        median = f"{f['repeat_median_s'] * 1e3:.1f} ms" if f["repeat_median_s"] is not None else "-"
        lines.append(f"fixup at W={f['world_size_layout']} shapes ({f['moe_layers']} MoE layers x "
                     f"{f['local_experts_per_layer']} local experts, {f['quantizers_on_rank']} quantizers): first call "
                     f"{f['first_s'] * 1e3:.1f} ms, repeats median {median}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="topk,all_experts", help="comma-separated calibration modes")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per fast run (after 1 warm-up)")
    parser.add_argument("--plain-batches", type=int, default=0,
                        help="also run the plain path on this many timed batches, and compare its amax with a fast "
                             "run on the same batches (0: skip)")
    parser.add_argument("--fixup-layers", type=int, default=61, help="layers of the W=8 fixup model (0: skip it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    parser.add_argument("--grouped", default="default",
                        help="grouped-GEMM layout on the GPU: default (FastOptions'), auto (the fastest measured), "
                             "skip (no measurement), or LAYOUT[,pad] (tokens_m, weights_m)")
    parser.add_argument("--profile-dir", default=None,
                        help="write torch.profiler's table of one extra batch of each mode's fast run here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default model=ds_v3_slice quant=nvfp4 ...)")
    opts = parser.parse_args(argv)
    results = run_bench(opts.overrides, [m.strip() for m in opts.modes.split(",") if m.strip()], opts.batches,
                        opts.plain_batches, opts.fixup_layers, torch.device(opts.device), opts.out, opts.profile_dir,
                        opts.grouped)
    print(format_table(results))
    return 0


def run_bench(overrides: list[str], modes: list[str], n_batches: int, plain_batches: int, fixup_layers: int,
              device: torch.device, out: str | None = None, profile_dir: str | None = None,
              grouped: str = "default") -> dict[str, Any]:
    """Everything ``main`` prints, as a dict (written to ``out`` after each step, so a crash keeps what ran)."""
    from deepseek_ptq.model.load import checkpoint_dir, resolve_args
    from deepseek_ptq.pipeline.data import make_batches

    base = with_slice_defaults(overrides)
    cfg = compose(base + [f"data.num_samples={(2 + max(n_batches, plain_batches)) * _batch_size(base)}"])
    args = resolve_args(cfg.model)
    batches = make_batches(cfg.data, args.vocab_size, str(checkpoint_dir(cfg.model, args, 1)), 0).calib
    setup = Setup(cfg, args, device, batches)
    results: dict[str, Any] = {"card": card(device), "overrides": base, "runs": [], "fast_vs_plain": {}}

    def save() -> None:
        if out:
            with open(out, "w") as f:
                json.dump(results, f, indent=1, default=str)

    results["ceilings"] = measure_ceilings(device)
    results["dequant"] = measure_dequant(device, results["ceilings"]["copy_GBps"])
    save()
    from deepseek_ptq.quant.fast import FastOptions, Grouped

    fast_options = FastOptions()
    if device.type == "cuda":
        results["combine_check"] = check_combine(device, fast_options.combine)
        save()
    if device.type == "cuda" and grouped != "skip":
        results["grouped"] = bench_grouped(device, args, batches[0].numel())
        gc.collect()
        torch.cuda.empty_cache()
        timed = [v for v in results["grouped"]["variants"] if "total_us" in v]
        if grouped == "auto" and timed:
            best = min(timed, key=lambda v: v["total_us"])
            fast_options = dataclasses.replace(fast_options, grouped_gpu=Grouped(best["layout"], best["pad"]))
        elif grouped not in ("auto", "default"):
            layout, _, pad = grouped.partition(",")
            fast_options = dataclasses.replace(fast_options, grouped_gpu=Grouped(layout, pad == "pad"))
        results["grouped"]["used"] = dataclasses.asdict(fast_options.grouped_gpu)
        save()
    batch, seq = batches[0].shape
    flops = calib_flops(args, batch, seq)
    results["flops_per_batch"] = flops
    if args.has_indexer:
        results["indexer"] = bench_indexer(device, args, batch, seq)
        save()
    for mode in modes:
        runs = [(True, n_batches)]
        if plain_batches:  # the plain path, and a fast run on the same batches to compare amax with
            runs += [(False, plain_batches)] + ([(True, plain_batches)] if plain_batches != n_batches else [])
        amax = {}
        for fast, count in runs:
            print(f"[bench] {mode} {'fast' if fast else 'plain'} x{count}", file=sys.stderr, flush=True)
            profile = os.path.join(profile_dir, f"profile_{mode}_{'fast' if fast else 'plain'}.txt") \
                if profile_dir and count >= 1 and (fast, count) == runs[0] else None
            result, amax[(fast, count)] = run_calibration(setup, mode, fast, count, profile, fast_options)
            result.update(floor_seconds(flops[mode], result["fp8_weight_bytes"], results["ceilings"]))
            if result["s_per_batch"]:
                result["ratio"] = result["s_per_batch"] / result["floor_s"]
            if mode == "all_experts":
                result["floor_min_s"] = floor_seconds(flops["all_experts_min"], result["fp8_weight_bytes"],
                                                      results["ceilings"])["floor_s"]
                result["ratio_min"] = result["s_per_batch"] / result["floor_min_s"] if result["s_per_batch"] else None
            results["runs"].append(result)
            save()
        if plain_batches:
            results["fast_vs_plain"][f"{mode}, {plain_batches + 1} batches"] = compare_amax(
                amax[(False, plain_batches)], amax[(True, plain_batches)])
            save()
    if fixup_layers:
        try:
            results["fixup_w8"] = bench_fixup(device, cfg.quant, n_layers=fixup_layers, profile_path=os.path.join(
                profile_dir, "profile_fixup.txt") if profile_dir else None)
        except Exception as err:  # keep what the runs measured
            results["fixup_w8_error"] = repr(err)[:500]
        save()
    return results


def _batch_size(overrides: list[str]) -> int:
    for o in reversed(overrides):
        if o.startswith("data.batch_size="):
            return int(o.split("=", 1)[1])
    return 8


if __name__ == "__main__":
    sys.exit(main())
