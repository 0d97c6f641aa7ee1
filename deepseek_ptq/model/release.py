"""Checkpoints in DeepSeek's release format that ship inside the package (``deepseek_ptq/model/<name>/``).

A packaged checkpoint is stored once, unsharded (``model0-mp1.safetensors`` plus ``config.json``). W = 1 reads it
in place; any other world size is sharded from it once into the cache, so every W holds the same weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import check_checkpoint, find_shards, shard_name, shard_state_dict
from deepseek_ptq.model.generate import atomic_save
from deepseek_ptq.model.kernels import quantize_fp8_blocks
from deepseek_ptq.model.transformer import Transformer

PACKAGE_DIR = Path(__file__).parent


def packaged_checkpoints() -> list[str]:
    return sorted(p.parent.name for p in PACKAGE_DIR.glob(f"*/{shard_name(0, 1)}"))


def packaged_dir(name: str) -> Path:
    path = PACKAGE_DIR / name
    if not (path / shard_name(0, 1)).exists():
        raise UserError(f"no packaged checkpoint named {name!r} (have: {packaged_checkpoints()})",
                        fix="set model.packaged_ckpt to one of those, or model.ckpt_dir to a checkpoint folder")
    return path


@torch.no_grad()
def release_state(full: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Full-precision weights (keys of the bf16 layout) -> the FP8 release layout of ``args``: every Linear
    weight float8_e4m3fn with a float32 128x128 block scale; embedding, gate, head and norms bf16; gate bias fp32."""
    with torch.device("meta"):
        layout = Transformer(args)
    out: dict[str, torch.Tensor] = {}
    for name, param in layout.named_parameters():
        if name.endswith(".scale"):
            continue  # written with its weight
        value = full[name].detach().float().cpu()
        if param.dtype == torch.float8_e4m3fn:
            module = name.rsplit(".", 1)[0]
            out[name], out[f"{module}.scale"] = quantize_fp8_blocks(value)
        else:
            out[name] = value.to(param.dtype).contiguous()
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def ensure_packaged_checkpoint(name: str, args: ModelArgs, world_size: int, cache_root: Path) -> Path:
    """The folder to load the packaged checkpoint ``name`` from at this world size.

    Safe when several ranks call it at once: each file is written aside and renamed into place, and the cache
    folder is named by the stored file's digest, so a newer package never reads stale shards.
    """
    source = packaged_dir(name)
    if world_size == 1:
        check_checkpoint(source, 1)
        return source
    ckpt_dir = cache_root / f"packaged-{name}-{_file_digest(source / shard_name(0, 1))}"
    found = find_shards(ckpt_dir)
    if world_size in found and len(found[world_size]) == world_size and (ckpt_dir / "config.json").exists():
        return ckpt_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    full = load_file(str(source / shard_name(0, 1)))
    for rank in range(world_size):
        atomic_save(shard_state_dict(full, args, rank, world_size), ckpt_dir / shard_name(rank, world_size))
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, suffix=".json.tmp")
    os.close(fd)
    shutil.copyfile(source / "config.json", tmp)
    os.replace(tmp, ckpt_dir / "config.json")
    return ckpt_dir
