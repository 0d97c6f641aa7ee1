"""Collect the layer-streamed benchmark runs of benchmarks/layerwise_gpu.sh into one JSON (stdout)."""

import json
import sys
from pathlib import Path

import torch

from deepseek_ptq.pipeline.rundir import read_amax

runs = Path(sys.argv[1])
out = {}
for run in sorted(p for p in runs.iterdir() if (p / "metrics.json").exists()):
    m = json.loads((run / "metrics.json").read_text())
    out[run.name] = {k: m.get(k) for k in ("status", "error", "timings_s", "tokens_calibrated", "calib_tokens_per_s",
                                            "memory", "layerwise", "counts")}
for mode in ("topk", "topk_host", "all_experts"):
    a, b = runs / f"slice4_resident_{mode.removesuffix('_host')}", runs / f"slice4_streamed_{mode}"
    if (a / "amax").exists() and (b / "amax").exists():
        x, y = read_amax(a, 1), read_amax(b, 1)
        same = [k for k in x if k in y and torch.equal(x[k], y[k])]
        rel = max(((x[k].float() - y[k].float()).abs() / x[k].float().abs().clamp_min(1e-12)).max().item() for k in x)
        out[f"identity_{mode}"] = {"quantizer_buffers": len(x), "identical": len(same), "max_rel_diff": rel}
a, b = runs / "disk3_topk", runs / "drawn3_topk"
if (a / "amax").exists() and (b / "amax").exists():
    x, y = read_amax(a, 1), read_amax(b, 1)
    out["disk_vs_drawn"] = {"quantizer_buffers": len(x), "identical": sum(torch.equal(x[k], y[k]) for k in x)}
if (runs / "write_slice.json").exists():
    out["write_slice"] = (runs / "write_slice.json").read_text().strip().splitlines()[-1]
print(json.dumps(out, indent=1))
