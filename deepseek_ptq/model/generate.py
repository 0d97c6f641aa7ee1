"""Seeded random checkpoints (the tiny default and shape-only models), written in DeepSeek's format.

The full (W = 1) weights come from one seed and are then sharded, so every world size holds the same model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepseek_ptq.files import atomic_write, write_json
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import find_shards, shard_name, shard_state_dict
from deepseek_ptq.model.kernels import quantize_fp8_blocks
from deepseek_ptq.model.transformer import Transformer


@torch.no_grad()
def random_full_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter of the unsharded model, drawn from ``seed`` in a fixed order."""
    with torch.device("meta"):
        layout = Transformer(args)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, param in layout.named_parameters():
        if name.endswith(".scale"):
            continue  # written with its weight
        module = name.rsplit(".", 1)[0]
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        elif name.endswith("gate.bias"):
            value = 0.05 * torch.randn(param.shape, generator=gen)
        elif name == "embed.weight":
            value = torch.randn(param.shape, generator=gen)
        else:
            value = torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5
        if param.dtype == torch.float8_e4m3fn:
            state[name], state[f"{module}.scale"] = quantize_fp8_blocks(value)
        else:
            state[name] = value.to(param.dtype)
    return state


def generated_dir(args: ModelArgs, seed: int, cache_root: Path) -> Path:
    digest = hashlib.sha256(json.dumps([args.to_dict(), seed], sort_keys=True).encode()).hexdigest()[:12]
    return cache_root / f"generated-{digest}"


def ensure_generated_checkpoint(args: ModelArgs, seed: int, world_size: int, cache_root: Path) -> Path:
    """The cached checkpoint for (args, seed), with this world size's shards written on first use.

    Safe when several ranks call it at once: each file is written aside and renamed into place.
    """
    ckpt_dir = generated_dir(args, seed, cache_root)
    if world_size in find_shards(ckpt_dir) and len(find_shards(ckpt_dir)[world_size]) == world_size:
        return ckpt_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    full = random_full_state(args, seed)
    for rank in range(world_size):
        atomic_save(shard_state_dict(full, args, rank, world_size), ckpt_dir / shard_name(rank, world_size))
    config = ckpt_dir / "config.json"
    if not config.exists():
        write_json(config, args.to_dict())
    return ckpt_dir


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
