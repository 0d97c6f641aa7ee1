"""What each rank contributes to the run directory, and what rank 0 writes from all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from deepseek_ptq.common import natural_key
from deepseek_ptq.quant.modules import quantized_linears


def amax_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer buffer (amax, AWQ pre-quant scales) keyed by module path, on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "_quantizer." in k}


def save_amax(model: nn.Module, run_dir: Path, rank: int, world_size: int) -> Path:
    path = run_dir / "amax" / f"amax_dict_rank{rank}-mp{world_size}.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(amax_state(model), path)
    return path


def quantizer_lines(model: nn.Module) -> dict[str, str]:
    """modelopt's quant-summary line of every quantizer on this rank."""
    return {name: f"{name:80} {mod}" for name, mod in model.named_modules() if isinstance(mod, TensorQuantizer)}


def write_quant_summary(per_rank: list[dict[str, str]], run_dir: Path) -> int:
    """The summary of the whole model: each quantizer once (shards of a tensor-parallel layer show rank 0's)."""
    merged: dict[str, str] = {}
    for lines in per_rank:
        for name, line in lines.items():
            merged.setdefault(name, line)
    ordered = [merged[n] for n in sorted(merged, key=natural_key)]
    (run_dir / ".quant_summary.txt").write_text("\n".join(ordered + [f"{len(ordered)} TensorQuantizers found in model"]) + "\n")
    return len(ordered)


def unquantized_linears(model: nn.Module) -> list[str]:
    return [name for name, m in quantized_linears(model)
            if not m.weight_quantizer.is_enabled and not m.input_quantizer.is_enabled]


def gather_to_all(obj: Any, world_size: int) -> list[Any]:
    """Every rank's object, on every rank (one collective, entered by all)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
