#!/usr/bin/env python3
"""All-experts statistics of one 671B MoE layer: the w2 input amax by torch's ops against the Triton kernel.

For one batch of T tokens (default 16 x 512) and E of a layer's experts (default 32), each expert takes the plain
path's two GEMMs (x w1^T, x w3^T, [T, 7168] x [7168, 2048]) and then either torch's silu, multiply and inf-norm
(three passes, two temporaries) or ``triton_kernels.swiglu_absmax`` (one read of the two GEMM outputs). Timed:
``all_token_stats`` both ways, the GEMMs alone (the floor of this scheme), and one GEMM over [w1; w3] (N = 4096)
alone, with whether its two halves equal the two GEMMs bit for bit (a fused GEMM is usable only where they do).
Checks the kernel's maxima against torch's before timing. Medians of CUDA-event timings; peak memory beside them.

    python scripts/bench_swiglu.py --out swiglu.json [--tokens 8192] [--experts 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepseek_ptq.devtools.bench import median_seconds  # noqa: E402
from deepseek_ptq.quant.fast import moe as fast_moe  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16 * 512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--dim", type=int, default=7168)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(int.from_bytes(os.urandom(4), "little"))
    t, e, dim, inter = opts.tokens, opts.experts, opts.dim, opts.inter
    x = torch.randn(t, dim, generator=gen, device=dev).bfloat16()
    w13 = (torch.randn(e, 2 * inter, dim, generator=gen, device=dev) * dim ** -0.5).bfloat16()
    result = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__, "tokens": t, "experts": e,
              "dim": dim, "inter": inter, "probe_exact": fast_moe.triton_swiglu_is_exact(dev)}

    stats = {k: fast_moe.ExpertStats.empty(e, dev) for k in ("torch", "triton")}
    fast_moe.all_token_stats(x, w13, stats["torch"], swiglu_kernel=False)
    fast_moe.all_token_stats(x, w13, stats["triton"], swiglu_kernel=True)
    result["amax_identical"] = bool(torch.equal(stats["torch"].w2, stats["triton"].w2))

    fused = F.linear(x, w13[0])
    result["fused_w13_gemm_identical"] = bool(torch.equal(fused[:, :inter], F.linear(x, w13[0, :inter]))
                                              and torch.equal(fused[:, inter:], F.linear(x, w13[0, inter:])))
    del fused

    def gemms_only() -> None:
        for i in range(e):
            F.linear(x, w13[i, :inter])
            F.linear(x, w13[i, inter:])

    def fused_gemm() -> None:
        for i in range(e):
            F.linear(x, w13[i])

    variants = {
        "torch_ops": lambda: fast_moe.all_token_stats(x, w13, stats["torch"], swiglu_kernel=False),
        "triton_kernel": lambda: fast_moe.all_token_stats(x, w13, stats["triton"], swiglu_kernel=True),
        "gemms_only": gemms_only,
        "fused_w13_gemm_only": fused_gemm,
    }
    flops = 2 * 2 * t * inter * dim  # the two GEMMs of one expert
    for name, fn in variants.items():
        torch.cuda.reset_peak_memory_stats(dev)
        ms = median_seconds(fn, dev, warmup=1, reps=7, inner=1) * 1e3 / e
        result[name] = {"ms_per_expert": round(ms, 4), "tflops_of_the_gemms": round(flops / ms / 1e9, 1),
                        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)}
    base = result["torch_ops"]["ms_per_expert"]
    # one 671B MoE layer (256 experts) over the reference's 1024 x 512 calibration tokens
    batches = 1024 * 512 / t
    result["s_per_layer_torch_ops"] = round(base * 256 * batches / 1e3, 2)
    result["s_per_layer_triton_kernel"] = round(result["triton_kernel"]["ms_per_expert"] * 256 * batches / 1e3, 2)
    print(json.dumps(result, indent=1))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["amax_identical"] and result["probe_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
