"""Whole (unsharded) tensors from DeepSeek's ``model{rank}-mp{W}.safetensors`` shards, one tensor at a time.

The inverse of ``model.checkpoint.shard_state_dict``: split tensors are concatenated along the dim
``split_dim`` names, routed experts come from the rank that holds them, replicated tensors from rank 0.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from deepseek_ptq.common import natural_key
from deepseek_ptq.errors import UserError
from deepseek_ptq.model.checkpoint import check_checkpoint, find_shards, shard_name, split_dim


def pick_world_size(ckpt_dir: Path, preferred: int | None) -> int:
    """The run's world size if its shards are there, else the smallest complete set in the folder."""
    found = find_shards(ckpt_dir) if ckpt_dir.is_dir() else {}
    complete = sorted(w for w, ranks in found.items() if sorted(ranks) == list(range(w)))
    if preferred in complete:
        return preferred
    if complete:
        return complete[0]
    check_checkpoint(ckpt_dir, preferred or 1)  # raises the clear error for what is missing
    raise AssertionError("unreachable")


class ShardReader:
    """Open every rank's shard lazily; ``get(key)`` reads only that tensor's parts."""

    def __init__(self, ckpt_dir: Path, world_size: int) -> None:
        check_checkpoint(ckpt_dir, world_size)
        self.world_size = world_size
        self._stack = ExitStack()
        self._files = [self._stack.enter_context(safe_open(str(ckpt_dir / shard_name(r, world_size)), framework="pt"))
                       for r in range(world_size)]
        self._ranks: dict[str, list[int]] = {}
        for rank, f in enumerate(self._files):
            for key in f.keys():
                self._ranks.setdefault(key, []).append(rank)

    def keys(self) -> list[str]:
        return sorted(self._ranks, key=natural_key)

    def __contains__(self, key: str) -> bool:
        return key in self._ranks

    def get(self, key: str) -> torch.Tensor:
        ranks = self._ranks[key]
        dim = split_dim(key)
        if dim is None or self.world_size == 1:
            return self._files[ranks[0]].get_tensor(key)
        if len(ranks) != self.world_size:
            raise UserError(f"{key} is split across ranks but only ranks {ranks} of {self.world_size} hold it",
                            fix="re-create the checkpoint shards")
        return torch.cat([self._files[r].get_tensor(key) for r in range(self.world_size)], dim=dim)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
