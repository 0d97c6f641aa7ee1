"""Two runs of one static-block recipe (say the CPU backend's and modelopt's GPU kernel's): per kind of amax
buffer, how many tensors and elements are bit-identical and the largest relative gap. JSON on stdout.

    python benchmarks/static_scales_compare.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]
"""

import json
import sys
from pathlib import Path

import torch

from deepseek_ptq.pipeline.rundir import read_amax


def kind(key: str) -> str:
    if ".input_quantizer." in key:
        return "input amax"
    return "weight block amax" if key.endswith("weight_quantizer._amax") else "weight " + key.rsplit(".", 1)[1]


def compare(a_dir: Path, b_dir: Path) -> dict:
    a, b = read_amax(a_dir, 1), read_amax(b_dir, 1)
    out: dict = {"keys_only_in_one": len(set(a) ^ set(b))}
    for key in sorted(set(a) & set(b)):
        x, y = a[key].float().cpu(), b[key].float().cpu()
        g = out.setdefault(kind(key), {"tensors": 0, "identical_tensors": 0, "elements": 0,
                                       "identical_elements": 0, "max_rel": 0.0})
        g["tensors"] += 1
        g["identical_tensors"] += int(torch.equal(x, y))
        g["elements"] += x.numel()
        g["identical_elements"] += int((x == y).sum())
        g["max_rel"] = max(g["max_rel"], ((x - y).abs() / x.abs().clamp_min(1e-30)).max().item())
    return out


if __name__ == "__main__":
    pairs = sys.argv[1:]
    print(json.dumps({f"{a} vs {b}": compare(Path(a), Path(b)) for a, b in zip(pairs[::2], pairs[1::2])}, indent=1))
