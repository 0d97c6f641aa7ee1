"""DeepSeek's converted checkpoint format: ``model{rank}-mp{W}.safetensors`` plus a ModelArgs config JSON.

Sharding follows DeepSeek's converter: column-parallel weights split dim 0, row-parallel weights dim 1,
embedding and head split by vocabulary, routed experts kept whole on the rank that owns them, the rest
replicated. An FP8 weight's ``.scale`` splits with it (the split falls on a 128-block boundary).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.kernels import BLOCK

_COLUMN = {"wq", "wq_b", "wkv_b", "w1", "w3", "head", "embed"}
_ROW = {"wo", "w2"}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
SHARD_RE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")


def shard_name(rank: int, world_size: int) -> str:
    return f"model{rank}-mp{world_size}.safetensors"


def split_dim(key: str) -> int | None:
    """The dim a tensor is split along across ranks, or None if replicated (routed experts: None too)."""
    if _EXPERT.search(key):
        return None
    module = key.rsplit(".", 2)[-2]
    if module in _COLUMN:
        return 0
    if module in _ROW:
        return 1
    return None


def expert_of(key: str) -> int | None:
    match = _EXPERT.search(key)
    return int(match.group(1)) if match else None


def shard_state_dict(full: dict[str, torch.Tensor], args: ModelArgs, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of an unsharded (W = 1) state dict."""
    per_rank = args.n_routed_experts // world_size
    out = {}
    for key, tensor in full.items():
        expert = expert_of(key)
        if expert is not None and not rank * per_rank <= expert < (rank + 1) * per_rank:
            continue
        dim = split_dim(key)
        if dim is not None and world_size > 1:
            if tensor.size(dim) % world_size:
                raise UserError(f"{key} of shape {tuple(tensor.shape)} does not split across {world_size} ranks",
                                fix="choose a world size that divides the model's dimensions")
            if tensor.dtype == torch.float8_e4m3fn and (tensor.size(dim) // world_size) % BLOCK:
                raise UserError(f"{key}: {tensor.size(dim)} / {world_size} is not a multiple of the {BLOCK}-wide FP8 block",
                                fix="choose a world size that keeps every shard on a 128 boundary")
            tensor = tensor.chunk(world_size, dim=dim)[rank]
        out[key] = tensor.contiguous()
    return out


def write_shards(full: dict[str, torch.Tensor], args: ModelArgs, ckpt_dir: Path, world_size: int) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):
        save_file(shard_state_dict(full, args, rank, world_size), str(ckpt_dir / shard_name(rank, world_size)))


def find_shards(ckpt_dir: Path) -> dict[int, list[int]]:
    """World sizes present in a folder and the ranks found for each."""
    found: dict[int, list[int]] = {}
    for path in ckpt_dir.glob("model*-mp*.safetensors"):
        match = SHARD_RE.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(int(match.group(1)))
    return found


def check_checkpoint(ckpt_dir: Path, world_size: int) -> None:
    """Fail before building the model when the folder lacks this world size's shards."""
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint folder {ckpt_dir} does not exist",
                        fix="set model.ckpt_dir to a folder holding model{rank}-mp{W}.safetensors (see scripts/convert_hf.py)")
    found = find_shards(ckpt_dir)
    if world_size not in found:
        if found:
            have = ", ".join(f"mp{w}" for w in sorted(found))
            raise UserError(f"{ckpt_dir} holds shards for {have}, not for world size {world_size}",
                            fix=f"run with the matching parallel option (parallel={'single' if 1 in found else 'mp' + str(min(found))}) "
                                f"or re-shard the checkpoint for mp{world_size}")
        raise UserError(f"{ckpt_dir} holds no model*-mp*.safetensors shards", fix="convert the checkpoint first")
    missing = sorted(set(range(world_size)) - set(found[world_size]))
    if missing:
        raise UserError(f"{ckpt_dir} lacks {', '.join(shard_name(r, world_size) for r in missing)}",
                        fix="copy or re-create the missing shards")


def load_shard(model: nn.Module, ckpt_dir: Path, rank: int, world_size: int, progress: bool = False) -> None:
    """Copy this rank's shard into the model, checking names, shapes and dtypes first."""
    path = ckpt_dir / shard_name(rank, world_size)
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
        if missing or unexpected:
            raise UserError(f"{path.name} does not match the model config: "
                            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
                            fix="use the config JSON that was written with this checkpoint")
        for key in tqdm(sorted(keys), desc=f"load {path.name}", disable=not progress, unit="tensor"):
            tensor_slice = f.get_slice(key)
            param = params[key]
            shape = tuple(tensor_slice.get_shape())
            if shape != tuple(param.shape):
                raise UserError(f"{path.name}: {key} has shape {shape}, the model config expects {tuple(param.shape)}",
                                fix="use the config JSON that was written with this checkpoint")
            tensor = f.get_tensor(key)
            if tensor.dtype != param.dtype:
                if tensor.dtype == torch.float8_e4m3fn or param.dtype == torch.float8_e4m3fn:
                    raise UserError(f"{path.name}: {key} is {tensor.dtype}, the model config expects {param.dtype}",
                                    fix="set dtype in the config JSON to match the checkpoint (fp8 or bf16)")
                tensor = tensor.to(param.dtype)
            param.data.copy_(tensor)
